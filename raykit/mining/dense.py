"""Dense retrieval for hard-negative mining: an HF encoder with mean pooling, on actors."""

from __future__ import annotations

import numpy as np

from raykit.config import MineConfig
from raykit.core.loading import resolve_model_path
from raykit.core.spec import DEFAULT_MAX_LEN
from raykit.mining.actors import map_on_actors


class TextEmbedder:
    """Ray Data actor: mean-pooled, L2-normalised embeddings of the `text` column."""

    def __init__(self, cfg: MineConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from raykit.core.precision import quantize_int8, resolve_dtype, torch_dtype

        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        path = resolve_model_path(cfg.embedder)
        self.device = torch.device("cuda" if cfg.use_gpu else "cpu")
        remote = cfg.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        self.model = AutoModel.from_pretrained(path, trust_remote_code=remote)
        self.model.to(self.device).eval()
        self.cfg = cfg
        precision = resolve_dtype(cfg.precision, self.device.type, cfg.allow_slow_precision)
        if precision == "int8":
            self.model = quantize_int8(self.model)
        self.autocast_dtype = torch_dtype(precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        texts = [str(t) for t in batch["text"]]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        step = self.cfg.batch_size
        for start in range(0, len(order), step):
            index = order[start : start + step]
            inputs = self.tokenizer(
                [texts[i] for i in index],
                padding=True,
                truncation=True,
                max_length=self.cfg.max_len or DEFAULT_MAX_LEN,
                return_tensors="pt",
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            enabled = self.autocast_dtype is not None
            autocast = torch.autocast(self.device.type, self.autocast_dtype, enabled=enabled)
            with torch.inference_mode(), autocast:
                hidden = self.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[index] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return {"row": batch["row"], "embedding": out}


def retrieve_dense(
    queries: list[str], corpus: list[str], k: int, cfg: MineConfig
) -> list[list[int]]:
    """Corpus indices of the top `k` hits per query by exact inner product of embeddings."""
    import torch

    texts = [cfg.query_instruction + q for q in queries] + corpus
    embeddings = torch.from_numpy(
        np.stack(map_on_actors({"text": texts}, TextEmbedder, cfg, "embedding"))
    )
    query_emb, corpus_emb = embeddings[: len(queries)], embeddings[len(queries) :]
    hits: list[list[int]] = []
    for start in range(0, len(queries), 1024):  # bounded memory: 1024 x corpus scores at a time
        scores = query_emb[start : start + 1024] @ corpus_emb.T
        hits += scores.topk(min(k, len(corpus)), dim=1).indices.tolist()
    return hits

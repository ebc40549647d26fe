"""The cross-encoder: loading, padding-aware forward passes, losses, and the `Reranker` API."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from raykit.config import ConfigError, resolve_model_path
from raykit.data import chunk_by_length, pad_encodings, tokenize_pairs
from raykit.storage import is_uri


def local_model_path(model: str) -> str:
    """A local directory or hub id for `model`: URIs (s3://, gs://, ...) are copied to a local
    cache once per machine (atomically, so concurrent actors never read a partial copy)."""
    if not is_uri(model):
        return resolve_model_path(model)
    import hashlib
    import tempfile

    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(model)
    files = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    if not any(f.base_name == "config.json" for f in files):
        raise FileNotFoundError(f"{model}: no config.json there")
    # The cache key covers every file's size and mtime: a model re-written at the same URI is
    # copied again, never served stale.
    signature = model + "".join(f"|{f.path}:{f.size}:{f.mtime_ns}" for f in files)
    root = os.path.join(tempfile.gettempdir(), "raykit-models")
    target = os.path.join(root, hashlib.sha1(signature.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(target, "config.json")):
        os.makedirs(root, exist_ok=True)
        partial = tempfile.mkdtemp(dir=root)
        pafs.copy_files(path, partial, source_filesystem=fs)
        try:
            os.rename(partial, target)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return target


def check_model(name_or_path: str, field: str = "model") -> None:
    """Fail fast, in one line, when a model can be found neither locally nor on the hub."""
    if is_uri(name_or_path):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(name_or_path)
        if fs.get_file_info(f"{path}/config.json").type == pafs.FileType.NotFound:
            raise ConfigError(f"{field}: no config.json under {name_or_path}")
        return
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{field}: {name_or_path} is a folder without a config.json")
        return
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
        raise ConfigError(
            f"{field}: {name_or_path!r} is neither a local folder nor a model id for the "
            "Hugging Face hub (no such folder)"
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{field}: {name_or_path!r} is neither a local folder nor a model reachable on the "
            f"Hugging Face hub ({reason[:200]})"
        ) from None


def load_model_and_tokenizer(
    name_or_path: str, trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """A one-logit sequence classifier and its tokenizer (a new head is created if missing).

    `name_or_path` is a hub id, a local directory, an embedded name or a URI (s3://...)."""
    path = local_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, trust_remote_code=trust_remote_code
    )
    if model.config.num_labels != 1:
        raise ValueError(f"{name_or_path}: expected a model with one output logit")
    return model, tokenizer


class CrossEncoder(nn.Module):
    """Scores a list of padded chunks in one `forward` call and returns the logits in order.

    Keeping the chunking inside one module means DDP sees a single forward per step, while each
    chunk is padded only to its own longest pair.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, chunks: list[dict[str, torch.Tensor]], order: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([self.hf_model(**chunk).logits.view(-1) for chunk in chunks])
        # `order[i]` is the position in `logits` of the i-th pair of the input.
        return logits[order]


def make_chunks(
    encodings: list[dict[str, list[int]]], token_budget: int, pad_id: int, device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, int]:
    """Sort pairs by length into padded chunks; returns chunks, the restoring order, pad tokens."""
    lengths = [len(e["input_ids"]) for e in encodings]
    chunks_index = chunk_by_length(lengths, token_budget)
    chunks, flat, padded = [], [], 0
    for index in chunks_index:
        batch = pad_encodings([encodings[i] for i in index], pad_id)
        padded += batch["input_ids"].numel()
        chunks.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        flat += index
    order = torch.empty(len(flat), dtype=torch.long)
    order[torch.tensor(flat)] = torch.arange(len(flat))
    return chunks, order.to(device), padded - sum(lengths)


def autocast_context(device: torch.device, fp16: bool = False, bf16: bool = False):
    """torch.autocast for fp16/bf16, or a no-op."""
    if not (fp16 or bf16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if fp16 else torch.bfloat16)


# ---------------------------------------------------------------------------- losses


def group_softmax_loss(logits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Cross-entropy over each group with the positive at index 0."""
    scores = logits.float().view(-1, group_size)
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores, target)


def distillation_loss(
    logits: torch.Tensor, teacher_scores: torch.Tensor, group_size: int, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) over each group's softmax at `temperature`, scaled by T^2."""
    student = F.log_softmax(logits.float().view(-1, group_size) / temperature, dim=-1)
    teacher = F.softmax(teacher_scores.float().view(-1, group_size) / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean") * temperature**2


# ---------------------------------------------------------------------------- inference


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Sequence[str]],
    max_len: int = 512,
    batch_size: int = 64,
    device: torch.device | None = None,
    fp16: bool = False,
    bf16: bool = False,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
) -> list[float]:
    """Raw logits for (query, passage) pairs, in input order.

    Pairs are sorted by length so each batch pads little; the model is expected in eval mode.
    """
    if not pairs:
        return []
    device = device or next(model.parameters()).device
    encodings = tokenize_pairs(
        tokenizer,
        [q for q, _ in pairs],
        [p for _, p in pairs],
        max_len,
        query_max_len,
        passage_max_len,
    )
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]["input_ids"]))
    scores = [0.0] * len(encodings)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = pad_encodings([encodings[i] for i in index], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, fp16, bf16):
            logits = model(**batch).logits.view(-1).float().cpu().tolist()
        for i, value in zip(index, logits, strict=True):
            scores[i] = value
    return scores


@torch.inference_mode()
def batch_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Float32 logits (on CPU) of one padded batch; autocast to fp16/bf16 when a dtype is given."""
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    enabled = autocast_dtype is not None
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=enabled):
        return model(**batch).logits.view(-1).float().cpu()


def sigmoid(x: float) -> float:
    """Numerically stable logistic function of one logit."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Reranker:
    """Score (query, passage) pairs with a cross-encoder checkpoint.

    >>> reranker = Reranker("out/")
    >>> reranker.compute_score(["what is ray?", "Ray is a distributed compute engine."])
    >>> reranker.rerank("what is ray?", ["a fruit", "a compute engine"], top_n=1)
    """

    def __init__(
        self,
        model_name_or_path: str,
        device: str | torch.device | None = None,
        fp16: bool = False,
        bf16: bool = False,
        max_length: int = 512,
        batch_size: int = 64,
        trust_remote_code: bool = False,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
    ):
        self.device = torch.device(device) if device else _default_device()
        self.model, self.tokenizer = load_model_and_tokenizer(
            model_name_or_path, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()
        # Autocast only where it pays off; on CPU fp16 is emulated and slow.
        self.fp16 = fp16 and self.device.type == "cuda"
        self.bf16 = bf16 and self.device.type == "cuda"
        self.max_length = max_length
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
        self.batch_size = batch_size

    def compute_score(
        self,
        pairs: Sequence[str] | Sequence[Sequence[str]],
        batch_size: int | None = None,
        normalize: bool = False,
    ) -> float | list[float]:
        """A float for one `[query, passage]`, a list of floats for a list of pairs."""
        single = len(pairs) == 2 and all(isinstance(x, str) for x in pairs)
        pair_list = [pairs] if single else list(pairs)
        scores = predict_logits(
            self.model,
            self.tokenizer,
            pair_list,
            max_len=self.max_length,
            batch_size=batch_size or self.batch_size,
            device=self.device,
            fp16=self.fp16,
            bf16=self.bf16,
            query_max_len=self.query_max_length,
            passage_max_len=self.passage_max_length,
        )
        if normalize:
            scores = torch.sigmoid(torch.tensor(scores)).tolist()
        return scores[0] if single else scores

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[tuple[int, float]]:
        """(index, score) of the documents, best first."""
        scores = self.compute_score([[query, d] for d in documents]) if documents else []
        ranked = sorted(enumerate(scores), key=lambda x: -x[1])
        return ranked[:top_n] if top_n is not None else ranked

"""Mine's false-negative filter: a reranker drops candidates scored close to the positives."""

from __future__ import annotations

import numpy as np

from raykit.config import MineConfig
from raykit.core.activation import sigmoid_array
from raykit.mining.actors import map_on_actors


class PairFilterScorer:
    """Ray Data actor: sigmoid cross-encoder scores of (`query`, `passage`) rows."""

    def __init__(self, cfg: MineConfig):
        from raykit.core.engine import InferenceEngine
        from raykit.runtime.console import quiet_ray

        quiet_ray()  # Ray's deprecation notices in this actor, as on the driver
        assert cfg.filter_model is not None
        self.engine = InferenceEngine.from_config(
            cfg,
            cfg.filter_model,
            use_gpu=cfg.use_gpu,
            threads=cfg.cpus_per_actor,
            max_batch_size=cfg.batch_size,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [[str(q), str(p)] for q, p in zip(batch["query"], batch["passage"], strict=True)]
        scores = sigmoid_array(self.engine.score_pairs(pairs))
        return {"row": batch["row"], "score": scores.astype(np.float32)}


def filter_false_negatives(
    groups: list[dict], candidates: list[list[str]], cfg: MineConfig
) -> tuple[list[list[str]], int]:
    """Drop candidates that the filter model scores above margin x its best positive's score."""
    queries, passages, owner = [], [], []
    for g, (group, texts) in enumerate(zip(groups, candidates, strict=True)):
        if not texts:
            continue
        for text in list(group["pos"]) + texts:
            queries.append(group["query"])
            passages.append(text)
            owner.append(g)
    scores = map_on_actors({"query": queries, "passage": passages}, PairFilterScorer, cfg, "score")
    kept: list[list[str]] = [list(t) for t in candidates]
    dropped, i = 0, 0
    for g, (group, texts) in enumerate(zip(groups, candidates, strict=True)):
        if not texts:
            continue
        n_pos = len(group["pos"])
        threshold = cfg.filter_margin * max(scores[i : i + n_pos])
        cand_scores = scores[i + n_pos : i + n_pos + len(texts)]
        kept[g] = [t for t, s in zip(texts, cand_scores, strict=True) if s <= threshold]
        dropped += len(texts) - len(kept[g])
        i += n_pos + len(texts)
    return kept, dropped

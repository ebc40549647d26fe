"""Ranking metrics and the evaluator that reranks each group's pos + neg candidates.

Relevance is binary: the `pos` passages are relevant, the `neg` ones are not. Tied scores are
ranked pessimistically (non-relevant first), so a model that scores everything the same gets no
credit for the positives-first order of the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raykit.config import EvaluateConfig

METRIC_NAMES = ("mrr@10", "ndcg@10", "map")


def mrr_at_k(ranked_labels: Sequence[int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant item within the top k, else 0."""
    for rank, label in enumerate(ranked_labels[:k], start=1):
        if label > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked_labels: Sequence[int], k: int = 10) -> float:
    """Normalised DCG over the top k with gains equal to the labels."""
    dcg = sum(label / math.log2(rank + 2) for rank, label in enumerate(ranked_labels[:k]))
    ideal = sorted(ranked_labels, reverse=True)
    idcg = sum(label / math.log2(rank + 2) for rank, label in enumerate(ideal[:k]))
    return dcg / idcg if idcg > 0 else 0.0


def average_precision(ranked_labels: Sequence[int]) -> float:
    """Mean of precision@i over the ranks i of the relevant items (whole list)."""
    hits, total = 0, 0.0
    for rank, label in enumerate(ranked_labels, start=1):
        if label > 0:
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


def rank_labels(scores: Sequence[float], labels: Sequence[int]) -> list[int]:
    """Labels in descending score order; ties put lower labels first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], labels[i]))
    return [labels[i] for i in order]


def group_metrics(scores: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    ranked = rank_labels(scores, labels)
    return {
        "mrr@10": mrr_at_k(ranked),
        "ndcg@10": ndcg_at_k(ranked),
        "map": average_precision(ranked),
    }


def candidates(group: dict) -> tuple[list[str], list[int]]:
    """A group's passages (positives first) and their binary labels."""
    return list(group["pos"]) + list(group["neg"]), [1] * len(group["pos"]) + [0] * len(
        group["neg"]
    )


def metric_sums(
    groups: Sequence[dict], score_pairs: Callable[[list[list[str]]], list[float]]
) -> dict[str, float]:
    """Sum of each metric over groups, plus `count`: summable across workers."""
    pairs, spans = [], []
    for group in groups:
        passages, labels = candidates(group)
        spans.append((len(pairs), len(passages), labels))
        pairs += [[group["query"], p] for p in passages]
    scores = score_pairs(pairs) if pairs else []
    sums = dict.fromkeys(METRIC_NAMES, 0.0)
    for start, n, labels in spans:
        for name, value in group_metrics(scores[start : start + n], labels).items():
            sums[name] += value
    sums["count"] = float(len(groups))
    return sums


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    count = sums.get("count", 0.0)
    return {name: (sums[name] / count if count else 0.0) for name in METRIC_NAMES}


def evaluate_groups(
    groups: Sequence[dict], score_pairs: Callable[[list[list[str]]], list[float]]
) -> dict[str, float]:
    """Mean MRR@10, NDCG@10 and MAP of `score_pairs` over the groups."""
    return mean_metrics(metric_sums(groups, score_pairs))


def evaluate_model(cfg: EvaluateConfig) -> dict[str, float]:
    """Load a model in this process and evaluate it on `cfg.eval_data`."""
    import torch

    from raykit.data import load_groups
    from raykit.engine import InferenceEngine
    from raykit.model import check_model

    check_model(cfg.model_name_or_path, "model_name_or_path")
    engine = InferenceEngine.from_config(
        cfg, cfg.model_name_or_path, use_gpu=torch.cuda.is_available(), threads=None,
        max_batch_size=cfg.eval_batch_size,
    )  # fmt: skip

    def score(pairs: list[list[str]]) -> list[float]:
        return engine.score_pairs(pairs).tolist()

    return evaluate_groups(load_groups(cfg.eval_data), score)

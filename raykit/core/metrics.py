"""IR evaluation with ir-measures (trec_eval's and other reference implementations).

Two inputs:
- raykit's groups: each group's `pos + neg` is reranked by a model; `pos` passages have
  relevance 1, `neg` 0. Tied scores are ranked pessimistically (non-relevant first) before the
  measures see the run, so a model that scores everything the same gets no credit for the
  positives-first order of the input, whichever ir-measures provider computes a measure.
- a TREC run (`qid Q0 docid rank score tag`) and qrels (TREC `qid 0 docid rel` or BEIR's TSV with
  a header), graded relevance, trec_eval's own semantics.

Measures are named as ir-measures names them (`nDCG@10`, `RR@10`, `AP`, `R@100`, `P@5`, ...);
raykit's older names `ndcg@10`, `mrr@10` and `map` are read as `nDCG@10`, `RR@10` and `AP`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from raykit.errors import ConfigError

if TYPE_CHECKING:
    from raykit.data.trec import RunEntry

DEFAULT_METRICS = ("nDCG@10", "RR@10", "AP")
LEGACY_NAMES = {"ndcg@10": "nDCG@10", "mrr@10": "RR@10", "map": "AP"}
COUNT_KEY = "count"


def parse_metrics(names: Iterable[str], field: str = "metrics") -> list[str]:
    """Canonical ir-measures names of `names` (duplicates dropped), or a ConfigError naming
    `field` and the measure it cannot parse."""
    import ir_measures

    parsed = []
    for name in names:
        name = LEGACY_NAMES.get(str(name).strip(), str(name).strip())
        try:
            parsed.append(str(ir_measures.parse_measure(name)))
        except Exception:  # ir-measures raises NameError, ValueError or SyntaxError
            raise ConfigError(
                f"{field}: unknown measure {name!r} (ir-measures names, e.g. nDCG@10 RR@10 AP "
                "R@100 P@5)"
            ) from None
    if not parsed:
        raise ConfigError(f"{field}: give at least one measure")
    return list(dict.fromkeys(parsed))


def canonical_metric(name: str, field: str = "metric_for_best_model") -> str:
    return parse_metrics([name], field)[0]


# ---------------------------------------------------------------------------- groups


def candidates(group: dict) -> tuple[list[str], list[int]]:
    """A group's passages (positives first) and their binary labels."""
    passages = list(group["pos"]) + list(group["neg"])
    return passages, [1] * len(group["pos"]) + [0] * len(group["neg"])


def group_qrels_and_run(
    labels_per_group: Sequence[Sequence[int]], scores_per_group: Sequence[Sequence[float]]
) -> tuple[list[Any], list[Any]]:
    """ir-measures qrels and run for groups, query ids "0", "1", ...: the run's scores are the
    ranks of a pessimistic order (by score, then non-relevant first), so it has no ties."""
    from ir_measures import Qrel, ScoredDoc

    qrels, run = [], []
    for q, (labels, scores) in enumerate(zip(labels_per_group, scores_per_group, strict=True)):
        qid = str(q)
        order = sorted(range(len(labels)), key=lambda i: (-scores[i], labels[i]))
        for rank, i in enumerate(order):
            qrels.append(Qrel(qid, f"d{i}", int(labels[i])))
            run.append(ScoredDoc(qid, f"d{i}", float(len(order) - rank)))
    return qrels, run


def per_query_sums(
    measures: Sequence[str], qrels: Sequence[Any], run: Sequence[Any], queries: int
) -> dict[str, float]:
    """Sum over queries of each measure, plus `count` = `queries`: summable across workers.
    A query a measure has no value for (no relevant passage) counts as 0."""
    import ir_measures

    sums = dict.fromkeys(measures, 0.0)
    parsed = {str(m): m for m in (ir_measures.parse_measure(n) for n in measures)}
    for metric in ir_measures.iter_calc(list(parsed.values()), qrels, run):
        sums[str(metric.measure)] += float(metric.value)
    sums[COUNT_KEY] = float(queries)
    return sums


def metric_sums(
    groups: Sequence[dict],
    score_pairs: Callable[[list[list[str]]], list[float]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Sum of each measure over `groups` reranked by `score_pairs`, plus `count`."""
    pairs, spans = [], []
    for group in groups:
        passages, labels = candidates(group)
        spans.append((len(pairs), labels))
        pairs += [[group["query"], p] for p in passages]
    scores = list(score_pairs(pairs)) if pairs else []
    labels_per_group = [labels for _, labels in spans]
    scores_per_group = [scores[start : start + len(labels)] for start, labels in spans]
    qrels, run = group_qrels_and_run(labels_per_group, scores_per_group)
    return per_query_sums(metrics, qrels, run, len(groups))


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Means of summed measures (see `metric_sums`), in the order they were asked for."""
    count = sums.get(COUNT_KEY, 0.0)
    return {
        name: (value / count if count else 0.0) for name, value in sums.items() if name != COUNT_KEY
    }


def evaluate_groups(
    groups: Sequence[dict],
    score_pairs: Callable[[list[list[str]]], list[float]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Mean of each measure of `score_pairs` over the groups."""
    return mean_metrics(metric_sums(groups, score_pairs, metrics))


# ---------------------------------------------------------------------------- runs and qrels


def evaluate_run(
    run: Sequence[RunEntry], qrels: Sequence[tuple[str, str, int]], metrics: Sequence[str]
) -> dict[str, float]:
    """Mean of each measure over the queries that have judgements (trec_eval's semantics
    with -c: a judged query missing from the run counts as 0)."""
    from ir_measures import Qrel, ScoredDoc

    judged = {qid for qid, _, _ in qrels}
    scored = [ScoredDoc(e.query_id, e.doc_id, e.score) for e in run]
    sums = per_query_sums(metrics, [Qrel(*q) for q in qrels], scored, len(judged))
    return mean_metrics(sums)

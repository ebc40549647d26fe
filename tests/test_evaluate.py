import math

import pytest

from raykit.evaluate import (
    average_precision,
    evaluate_groups,
    group_metrics,
    mrr_at_k,
    ndcg_at_k,
)


def test_metrics_on_hand_made_rankings():
    ranked = [0, 1, 0, 1]  # relevant at ranks 2 and 4
    assert mrr_at_k(ranked) == pytest.approx(0.5)
    assert average_precision(ranked) == pytest.approx((1 / 2 + 2 / 4) / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at_k(ranked) == pytest.approx(dcg / idcg)


def test_perfect_and_worst_rankings():
    assert group_metrics([3.0, 2.0, 1.0], [1, 0, 0]) == {"mrr@10": 1.0, "ndcg@10": 1.0, "map": 1.0}
    worst = group_metrics([1.0, 2.0, 3.0], [1, 0, 0])
    assert worst["mrr@10"] == pytest.approx(1 / 3)
    assert worst["map"] == pytest.approx(1 / 3)


def test_cutoff_at_k():
    ranked = [0] * 10 + [1]
    assert mrr_at_k(ranked, k=10) == 0.0
    assert ndcg_at_k(ranked, k=10) == 0.0
    assert average_precision(ranked) == pytest.approx(1 / 11)


def test_ties_are_ranked_pessimistically():
    # A constant scorer must not get credit for the positives-first input order.
    assert group_metrics([0.0, 0.0, 0.0], [1, 0, 0])["mrr@10"] == pytest.approx(1 / 3)


def test_evaluate_groups_scores_every_candidate():
    groups = [
        {"query": "q1", "pos": ["good"], "neg": ["bad", "worse"]},
        {"query": "q2", "pos": ["good"], "neg": ["bad"]},
    ]
    seen = []

    def score(pairs):
        seen.extend(pairs)
        return [1.0 if p == "good" else 0.0 for _, p in pairs]

    assert evaluate_groups(groups, score) == {"mrr@10": 1.0, "ndcg@10": 1.0, "map": 1.0}
    assert len(seen) == 5 and ["q2", "bad"] in seen

"""Tokenising pairs under their limits and cutting them into length-sorted chunks."""

from __future__ import annotations

from raykit.core.batching import chunk_by_length
from raykit.core.tokenize import tokenize_pairs


def split_cost(
    parts: list[list[int]], lengths: list[int], budget: int, most: int | None, cost: int
) -> float:
    """Padded tokens + `cost` per chunk; infinite when a chunk breaks the budget or the cap."""
    for part in parts:
        too_big = len(part) > 1 and max(lengths[i] for i in part) * len(part) > budget
        if too_big or (most and len(part) > most):
            return float("inf")
    return sum(max(lengths[i] for i in p) * len(p) + cost for p in parts)


def test_chunk_by_length_bounds_padding():
    lengths = [100, 10, 12, 95, 11, 50]
    chunks = chunk_by_length(lengths, token_budget=200)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    for chunk in chunks:
        assert max(lengths[i] for i in chunk) * len(chunk) <= 200 or len(chunk) == 1
    assert chunk_by_length([500], 100) == [[0]]
    same = chunk_by_length([5] * 7, 1000, max_items=3)
    assert len(same) == 3 and max(len(c) for c in same) == 3
    assert sorted(i for c in same for i in c) == list(range(7))


def test_tokenize_pairs_truncates_passage_first(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    query, passage = "how do I boil an egg", "egg water " * 100
    (encoded,) = tokenize_pairs(tokenizer, [query], [passage], max_len=32)
    assert len(encoded["input_ids"]) == 32
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"][1 : 1 + len(query_ids)] == query_ids  # query kept whole
    (short,) = tokenize_pairs(tokenizer, ["long query " * 50], ["passage"], max_len=32)
    assert len(short["input_ids"]) <= 32
    assert short["token_type_ids"].count(1) >= 2  # the passage survives a long query


def test_chunking_is_the_cheapest_split_of_the_sorted_pairs():
    """Against brute force: every split of the longest-first order into runs; the chunker's
    split costs the least of them."""
    import itertools
    import random

    from raykit.core.batching import chunk_by_length

    rng = random.Random(7)
    for _ in range(60):
        lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 9))]
        budget, most, cost = rng.choice([100, 300, 1000]), rng.choice([None, 2, 4]), 32
        chunks = chunk_by_length(lengths, budget, most, cost)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        best = float("inf")
        for cuts in itertools.product([0, 1], repeat=len(order) - 1):
            parts, current = [], [order[0]]
            for cut, i in zip(cuts, order[1:], strict=True):
                if cut:
                    parts.append(current)
                    current = []
                current.append(i)
            best = min(best, split_cost([*parts, current], lengths, budget, most, cost))
        assert split_cost(chunks, lengths, budget, most, cost) == best

import math

import pytest
import torch

from raykit.data import pad_encodings, tokenize_pairs
from raykit.model import (
    CrossEncoder,
    Reranker,
    distillation_loss,
    group_softmax_loss,
    load_model_and_tokenizer,
    make_chunks,
)


def test_group_softmax_loss_matches_hand_computation():
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    second = -math.log(1 / 3)
    assert group_softmax_loss(logits, 3).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_distillation_loss():
    student = torch.tensor([1.0, 0.0, -1.0])
    assert distillation_loss(student, student.clone(), 3, 1.0).item() == pytest.approx(0, abs=1e-7)
    teacher = torch.tensor([0.0, 0.0, 0.0])
    p = torch.softmax(student, 0)
    expected = sum((1 / 3) * math.log((1 / 3) / p[i].item()) for i in range(3))
    assert distillation_loss(student, teacher, 3, 1.0).item() == pytest.approx(expected, rel=1e-5)
    # Temperature softens both sides and rescales by T^2.
    assert distillation_loss(student, teacher, 3, 2.0).item() < 4 * expected


def test_chunked_forward_equals_one_padded_batch(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    model.eval()
    queries = ["how long to boil an egg"] * 4 + ["why is the sky blue"] * 4
    passages = ["six minutes", "eggs keep for weeks " * 8, "soft yolk " * 20, "a"] * 2
    encodings = tokenize_pairs(tokenizer, queries, passages, max_len=64)
    with torch.no_grad():
        full = model(**pad_encodings(encodings, tokenizer.pad_token_id)).logits.view(-1)
        chunks, order, pad_tokens = make_chunks(encodings, 64, tokenizer.pad_token_id, "cpu")
        chunked = CrossEncoder(model)(chunks, order)
    assert len(chunks) > 1
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-4)
    full_padding = max(len(e["input_ids"]) for e in encodings) * len(encodings)
    assert pad_tokens < full_padding - sum(len(e["input_ids"]) for e in encodings)


def test_reranker_scores_keep_input_order(tiny_model_dir):
    reranker = Reranker(tiny_model_dir, max_length=64, batch_size=2)
    pairs = [["q one", "short"], ["q two", "a much longer passage " * 5], ["q three", "mid len"]]
    batch = reranker.compute_score(pairs)
    single = [reranker.compute_score(p) for p in pairs]
    assert isinstance(single[0], float) and isinstance(batch, list)
    assert batch == pytest.approx(single, abs=1e-5)
    normalized = reranker.compute_score(pairs, normalize=True)
    assert normalized == pytest.approx([1 / (1 + math.exp(-s)) for s in batch], abs=1e-6)


def test_rerank_sorts_and_cuts(tiny_model_dir):
    reranker = Reranker(tiny_model_dir, max_length=64)
    docs = ["first doc", "second one here", "third", "fourth passage text"]
    ranked = reranker.rerank("a query", docs)
    scores = reranker.compute_score([["a query", d] for d in docs])
    assert [i for i, _ in ranked] == sorted(range(4), key=lambda i: -scores[i])
    assert reranker.rerank("a query", docs, top_n=2) == ranked[:2]
    assert reranker.rerank("a query", []) == []

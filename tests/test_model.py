import math

import pytest
import torch

from raykit.core.batching import make_chunks, pad_encodings
from raykit.core.head import CrossEncoder
from raykit.core.loading import load_model_and_tokenizer
from raykit.core.losses import distillation_loss, group_softmax_loss
from raykit.core.reranker import Reranker
from raykit.core.tokenize import tokenize_pairs


def test_group_softmax_loss_matches_hand_computation():
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    second = -math.log(1 / 3)
    assert group_softmax_loss(logits, 3).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_distillation_loss_is_kl_at_temperature_times_t_squared():
    student = torch.tensor([1.0, 0.0, -1.0, 0.5, 0.5, -2.0])
    teacher = torch.tensor([3.0, 1.0, -1.0, -1.0, 2.0, 0.0])
    assert distillation_loss(student, student.clone(), 3, 1.0).item() == pytest.approx(0, abs=1e-7)

    def by_hand(temperature: float) -> float:
        """KL(teacher || student) of each group's softmax at `temperature`, x T^2, averaged."""
        total = 0.0
        for g in range(2):
            s = [x / temperature for x in student[3 * g : 3 * g + 3].tolist()]
            t = [x / temperature for x in teacher[3 * g : 3 * g + 3].tolist()]
            p = [math.exp(x) / sum(math.exp(y) for y in t) for x in t]
            log_q = [x - math.log(sum(math.exp(y) for y in s)) for x in s]
            total += sum(pi * (math.log(pi) - qi) for pi, qi in zip(p, log_q, strict=True))
        return total / 2 * temperature**2

    for temperature in (1.0, 2.0, 0.5):
        loss = distillation_loss(student, teacher, 3, temperature).item()
        assert loss == pytest.approx(by_hand(temperature), rel=1e-5)
    # The temperature matters, and without the T^2 factor the value would be 4x smaller.
    assert by_hand(2.0) != pytest.approx(by_hand(1.0), rel=0.05)


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

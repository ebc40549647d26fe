"""Model FLOP utilisation: the FLOPs per token that MFU assumes are what torch itself counts
in a real forward and backward (full fine-tune, LoRA, a decoder), and the measured CPU peak is
a real rate, remembered per node, measured without touching the training RNG."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from raykit.core.adapters import add_lora
from raykit.core.head import head_scores
from raykit.training import flops
from raykit.training.flops import ModelFlops
from tests.helpers import build_tiny_decoder, build_tiny_reranker

LENGTH, BATCH = 96, 2


def counted_flops_per_token(model: torch.nn.Module, yes_no=None) -> float:
    """torch's own count of one forward and backward, per token (eager attention: its CPU SDPA
    kernel is not in the counter's table)."""
    ids = torch.randint(5, 500, (BATCH, LENGTH))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with FlopCounterMode(display=False) as counter:
        head_scores(model, batch, yes_no).sum().backward()
    return counter.get_total_flops() / (BATCH * LENGTH)


@pytest.fixture
def bert(tmp_path):
    """A fresh model per test: LoRA wraps its modules in place."""
    from transformers import AutoModelForSequenceClassification

    path = build_tiny_reranker(tmp_path / "bert", hidden_size=128, layers=6)
    return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")


def test_flops_per_token_of_a_full_fine_tune_are_what_torch_counts(bert):
    model_flops = ModelFlops.of(bert)
    vocab_weights = bert.bert.embeddings.word_embeddings.weight.numel()
    assert model_flops.body_params < sum(p.numel() for p in bert.parameters()) - vocab_weights
    assert model_flops.per_token(LENGTH) == pytest.approx(counted_flops_per_token(bert), rel=0.01)


def test_a_lora_run_is_not_credited_with_the_frozen_weights_gradients(bert):
    lora = add_lora(
        bert,
        decoder=False,
        rank=4,
        alpha=8,
        dropout=0.0,
        target_modules=["query", "value"],
        base_name="tiny",
    )
    model_flops = ModelFlops.of(lora)
    assert model_flops.trainable_body_params < model_flops.body_params / 10
    # Over-counted: the first layer's input gradients, which nothing needs (3% at 6 layers).
    assert model_flops.per_token(LENGTH) == pytest.approx(counted_flops_per_token(lora), rel=0.05)


def test_a_decoder_counts_its_head_dim_and_not_its_vocabulary_head(tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_tiny_decoder(tmp_path / "qwen3", hidden_size=128, heads=4)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    model_flops = ModelFlops.of(model)
    assert model_flops.attention_width == 128
    lm_head = model.get_output_embeddings().weight.numel()
    assert model_flops.body_params < sum(p.numel() for p in model.parameters()) - lm_head
    counted = counted_flops_per_token(model, yes_no=(5, 6))
    assert model_flops.per_token(LENGTH) == pytest.approx(counted, rel=0.01)


def test_the_cpu_peak_is_measured_once_per_node_and_then_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYKIT_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    rng = torch.get_rng_state()
    peak = flops.peak_flops(cpu, torch.float32)
    # Measuring draws from a generator of its own: a run's dropout does not depend on the cache.
    assert torch.equal(torch.get_rng_state(), rng)
    assert peak.source == "measured GEMM" and 1e8 < peak.flops_per_s < 1e13
    cached = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(cached.values()) == [peak.flops_per_s]

    def measure_again(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(flops, "measure_gemm_rate", measure_again)
    assert flops.peak_flops(cpu, torch.float32) == peak
    (tmp_path / "peak_flops.json").write_text("not json")  # a torn file is measured again
    with pytest.raises(AssertionError, match="measured again"):
        flops.peak_flops(cpu, torch.float32)

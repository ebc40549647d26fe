"""`--torch_compile`: training steps through the inductor-compiled chunk scorer give the eager
losses to 1e-4, step after step, over chunks of changing shapes, while evaluation (which calls
the Hugging Face model directly) stays eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykit.config import ConfigError, FinetuneConfig
from raykit.core.batching import make_chunks
from raykit.core.head import CrossEncoder
from raykit.core.loading import load_model_and_tokenizer
from raykit.core.losses import group_softmax_loss
from raykit.core.tokenize import tokenize_pairs
from raykit.data.groups import load_groups, sample_group
from raykit.training.recipe import compile_for_training
from tests.helpers import SAMPLE_TRAIN

GROUP_SIZE = 4


def train_losses(model_dir: str, compiled: bool, steps: int = 5) -> list[float]:
    torch.manual_seed(0)
    hf_model, tokenizer = load_model_and_tokenizer(model_dir)
    for module in hf_model.modules():  # equal losses need equal (no) dropout masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = CrossEncoder(hf_model)
    if compiled:
        compile_for_training(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    records, rng = load_groups(str(SAMPLE_TRAIN)), np.random.default_rng(0)
    losses = []
    for step in range(steps):
        groups = [sample_group(r, GROUP_SIZE, rng) for r in records[step * 3 : step * 3 + 3]]
        encodings = tokenize_pairs(
            tokenizer,
            [g.query for g in groups for _ in g.passages],
            [p for g in groups for p in g.passages],
            64,
        )
        # A small budget: several chunks per step, of different pairs and lengths.
        chunks, order, _ = make_chunks(encodings, 300, tokenizer.pad_token_id, "cpu")
        loss = group_softmax_loss(model(chunks, order), GROUP_SIZE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_training_steps_equal_eager_ones(tiny_model_dir):
    torch._dynamo.reset()
    eager = train_losses(tiny_model_dir, compiled=False)
    compiled = train_losses(tiny_model_dir, compiled=True)
    assert compiled == pytest.approx(eager, abs=1e-4)
    assert eager[-1] < eager[0]  # the steps train: not a constant both runs share
    # Chunk shapes changed from step to step, yet dynamic shapes compiled only a few graphs.
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


def test_compiling_is_refused_with_fsdp():
    with pytest.raises(ConfigError, match="torch_compile: not with fsdp"):
        FinetuneConfig(train_data=["x.jsonl"], torch_compile=True, fsdp=True)

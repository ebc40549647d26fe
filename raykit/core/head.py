"""How a model's output becomes a score: `head_scores`, the one scoring head that training
(`CrossEncoder`, the chunked forward module DDP wraps) and the inference engine share."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn


def head_scores(
    model: nn.Module, batch: dict[str, torch.Tensor], yes_no: tuple[int, int] | None = None
) -> torch.Tensor:
    """One score per row of a padded batch: a cross-encoder's one logit, or, with `yes_no`
    (token ids), a decoder's logit(yes) - logit(no) at the last position of its left-padded
    prompts (computed in float32)."""
    if yes_no is None:
        return model(**batch).logits.view(-1)
    last = model(**batch, logits_to_keep=1).logits[:, -1, :].float()
    return last[:, yes_no[0]] - last[:, yes_no[1]]


class CrossEncoder(nn.Module):
    """Scores a list of padded chunks in one `forward` call and returns the logits in order.

    Keeping the chunking inside one module means DDP sees a single forward per step, while each
    chunk is padded only to its own longest pair. With `yes_no` (token ids) the model is a
    decoder reranker: chunks are left-padded prompts and the score is logit(yes) - logit(no) at
    the last position (`head_scores`, as in the inference engine).
    """

    def __init__(self, hf_model: nn.Module, yes_no: tuple[int, int] | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.yes_no = yes_no
        self.chunk_scores: Callable[[dict[str, torch.Tensor]], torch.Tensor] = partial(
            head_scores, hf_model, yes_no=yes_no
        )

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the scoring of one chunk (`torch.compile` options), not `hf_model` itself:
        evaluation, which calls `hf_model` directly, stays eager and compiles nothing."""
        self.chunk_scores = torch.compile(self.chunk_scores, *args, **kwargs)

    def forward(self, chunks: list[dict[str, torch.Tensor]], order: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([self.chunk_scores(chunk) for chunk in chunks])
        # `order[i]` is the position in `logits` of the i-th pair of the input.
        return logits[order]

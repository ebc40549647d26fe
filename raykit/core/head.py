"""How a model's output becomes a score, for training (`CrossEncoder`, the chunked forward
module DDP wraps) and for the logistic normalisation of raw scores."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class CrossEncoder(nn.Module):
    """Scores a list of padded chunks in one `forward` call and returns the logits in order.

    Keeping the chunking inside one module means DDP sees a single forward per step, while each
    chunk is padded only to its own longest pair. With `yes_no` (token ids) the model is a
    decoder reranker: chunks are left-padded prompts and the score is logit(yes) - logit(no) at
    the last position, as in `raykit.core.engine`.
    """

    def __init__(self, hf_model: nn.Module, yes_no: tuple[int, int] | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.yes_no = yes_no

    def score(self, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.yes_no is None:
            return self.hf_model(**chunk).logits.view(-1)
        last = self.hf_model(**chunk, logits_to_keep=1).logits[:, -1, :]
        return last[:, self.yes_no[0]] - last[:, self.yes_no[1]]

    def forward(self, chunks: list[dict[str, torch.Tensor]], order: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([self.score(chunk) for chunk in chunks])
        # `order[i]` is the position in `logits` of the i-th pair of the input.
        return logits[order]


def sigmoid(x: float) -> float:
    """Numerically stable logistic function of one logit."""
    import math

    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def sigmoid_array(logits: np.ndarray) -> np.ndarray:
    """The logistic function of many logits, in float64 and without overflow warnings."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))

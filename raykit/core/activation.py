"""The activation of normalised scores (`normalize`, the APIs' relevance_score, mine's filter):
numpy only, so drivers that write scores need no torch."""

from __future__ import annotations

import numpy as np


def sigmoid_array(logits: np.ndarray) -> np.ndarray:
    """The logistic function of many logits, in float64 and without overflow warnings."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))

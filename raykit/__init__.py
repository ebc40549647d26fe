"""raykit: fine-tune, sweep, batch-score and serve cross-encoder rerankers on Ray."""

from typing import Any

from raykit.config import EvaluateConfig, FinetuneConfig, load_config

__all__ = ["EvaluateConfig", "FinetuneConfig", "Reranker", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`raykit.Reranker` imports torch and transformers only when it is used, so that the CLI
    (`raykit --help`, config errors) starts in well under a second."""
    if name == "Reranker":
        from raykit.core.reranker import Reranker

        return Reranker
    raise AttributeError(f"module 'raykit' has no attribute {name!r}")

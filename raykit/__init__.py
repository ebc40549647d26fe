"""raykit: fine-tune, sweep, batch-score and serve cross-encoder rerankers on Ray."""

from typing import Any

__all__ = ["EvaluateConfig", "FinetuneConfig", "Reranker", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Imported on use: `raykit.Reranker` loads torch and transformers (and no Ray), the
    configs pydantic, so that the CLI and the model core start with only what they need."""
    if name == "Reranker":
        from raykit.core.reranker import Reranker

        return Reranker
    if name in ("EvaluateConfig", "FinetuneConfig", "load_config"):
        from raykit import config

        return getattr(config, name)
    raise AttributeError(f"module 'raykit' has no attribute {name!r}")

"""raykit: fine-tune, sweep, batch-score and serve cross-encoder rerankers on Ray."""

from raykit.config import EvaluateConfig, FinetuneConfig, load_config
from raykit.model import Reranker

__all__ = ["EvaluateConfig", "FinetuneConfig", "Reranker", "load_config"]
__version__ = "0.1.0"

"""`raykit evaluate`: a model on groups, or a TREC run against qrels, measured with ir-measures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from raykit.core.metrics import evaluate_groups, evaluate_run

if TYPE_CHECKING:
    from raykit.config import EvaluateConfig


# ---------------------------------------------------------------------------- the command


def evaluate_model(cfg: EvaluateConfig) -> dict[str, float]:
    """Load a model in this process and evaluate it on `cfg.eval_data`."""
    import torch

    from raykit.core.engine import InferenceEngine
    from raykit.core.loading import check_model
    from raykit.data.groups import load_groups
    from raykit.runtime.logs import logger

    check_model(cfg.model_name_or_path, "model_name_or_path")
    engine = InferenceEngine.from_config(
        cfg,
        cfg.model_name_or_path,
        use_gpu=torch.cuda.is_available(),
        threads=None,
        max_batch_size=cfg.eval_batch_size,
        announce=logger.info,
    )

    def score(pairs: list[list[str]]) -> list[float]:
        return engine.score_pairs(pairs).tolist()

    return evaluate_groups(load_groups(cfg.eval_data), score, cfg.metrics)


def run_evaluate(cfg: EvaluateConfig) -> dict[str, float]:
    """`raykit evaluate`: a TREC run against qrels, or a model on groups; writes `cfg.output`."""
    from raykit.data.trec import read_qrels, read_run

    if cfg.run:
        metrics = evaluate_run(read_run(cfg.run), read_qrels(cfg.qrels), cfg.metrics)
    else:
        metrics = evaluate_model(cfg)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

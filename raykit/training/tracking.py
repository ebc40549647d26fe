"""Experiment tracking for `finetune` and `tune`: `--report_to tensorboard mlflow wandb`.

As the Hugging Face Trainer does on its main process, rank 0 of the training workers logs to
each backend while it trains: the config once, every logged training metric (loss, lr,
throughput) and every evaluation with its optimizer step, and at the end the output model path.
The series are exactly the `loss` and `eval` entries of `train_summary.json`, under `train/` and
`eval/` (`@` is `_at_` in TensorBoard and MLflow names). Each library is imported only when
asked for, on the worker; the driver's MLFLOW_* and WANDB_* variables are passed to it.

Where runs go, as each library's users expect:
- tensorboard: event files in `logging_dir` (default: the run's folder in Ray's storage,
  `<storage_path>/<run_name>/tensorboard`; a sweep's trials get one sub-folder each);
- mlflow: `MLFLOW_TRACKING_URI` (default `./mlruns`), experiment `MLFLOW_EXPERIMENT_NAME`
  (default: the sweep's name, or "raykit"), one MLflow run per fine-tune or trial;
- wandb: project `WANDB_PROJECT` (default "raykit"), `WANDB_MODE=offline` to log without an
  account; a sweep's trials share a W&B group named after the sweep.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Protocol

from raykit.config import PACKAGES, FinetuneConfig
from raykit.errors import ConfigError
from raykit.runtime.storage import join


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, outcome: dict[str, Any]) -> None: ...


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Config values as tracking params: lists and None as text (MLflow takes only scalars)."""
    return {
        key: value if isinstance(value, bool | int | float | str) else json.dumps(value)
        for key, value in config.items()
    }


class TensorBoardTracker:
    """Scalars per step in TensorBoard event files, with tensorboardX (a Ray dependency)."""

    def __init__(self, logging_dir: str, run_name: str, config: dict[str, Any]):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logging_dir)
        lines = [f"| {k} | {v} |" for k, v in flat_config(config).items()]
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + "\n".join(lines))
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(safe_key(key), value, step)
        self.writer.flush()

    def finish(self, outcome: dict[str, Any]) -> None:
        self.writer.add_text("outcome", json.dumps(outcome, indent=2, default=str))
        self.writer.close()


def safe_key(name: str) -> str:
    """TensorBoard and MLflow take letters, digits and `_-./`: `nDCG@10` is `nDCG_at_10`."""
    return re.sub(r"[^\w\-./]", "_", name.replace("@", "_at_"))


class MLflowTracker:
    """One MLflow run: the config as params, metrics with their step, the model path as a tag."""

    def __init__(self, run_name: str, group: str | None, config: dict[str, Any]):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self.metric = Metric
        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, or ./mlruns
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or group or "raykit"
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = {"raykit.sweep": group} if group else {}
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [self.metric(safe_key(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, outcome: dict[str, Any]) -> None:
        for key, value in outcome.items():
            self.client.set_tag(self.run_id, f"raykit.{key}", str(value))
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run (its own `wandb.Run`, so several can live in one process)."""

    def __init__(self, run_name: str, group: str | None, config: dict[str, Any], logging_dir: str):
        import wandb

        os.makedirs(logging_dir, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "raykit"),
            name=run_name,
            group=group,
            config=config,
            dir=logging_dir,
            reinit="create_new",
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, outcome: dict[str, Any]) -> None:
        for key, value in outcome.items():
            self.run.summary[key] = value
        self.run.finish()


def tracking_env() -> dict[str, str]:
    """The driver's MLFLOW_* and WANDB_* settings, for rank 0 (which may run on another node,
    or in a Ray instance started before they were set)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "WANDB_"))}


def open_trackers(
    backends: list[str],
    run_name: str,
    logging_dir: str,
    config: dict[str, Any],
    group: str | None = None,
) -> list[Tracker]:
    """One tracker per backend; a missing library is a ConfigError naming what to install."""
    trackers: list[Tracker] = []
    for backend in backends:
        try:
            if backend == "tensorboard":
                trackers.append(TensorBoardTracker(logging_dir, run_name, config))
            elif backend == "mlflow":
                trackers.append(MLflowTracker(run_name, group, config))
            elif backend == "wandb":
                trackers.append(WandbTracker(run_name, group, config, logging_dir))
        except ImportError as exc:
            raise ConfigError(
                f"report_to: {backend} needs `pip install {PACKAGES[backend]}` ({exc})"
            ) from exc
    return trackers


def tracking_dir(cfg: FinetuneConfig) -> str:
    """TensorBoard and W&B files: `logging_dir`, else the run's folder in Ray's storage."""
    if cfg.logging_dir:
        return cfg.logging_dir
    storage = cfg.storage_path or os.path.expanduser("~/ray_results")
    return join(storage, cfg.run_name or "raykit", "tensorboard")

"""`raykit finetune`: check the options and data, start Ray, run the recipe on a `TorchTrainer`
and export the best checkpoint."""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer

from raykit.config import ConfigError, FinetuneConfig
from raykit.core.loading import resolve_model_path
from raykit.core.precision import describe_precision
from raykit.core.spec import check_reranker
from raykit.data.groups import (
    INVALID_HINT,
    DataError,
    GroupStream,
    collect_groups,
    raise_for_invalid,
    stream_groups,
)
from raykit.runtime.cluster import hold_run_lock, init_ray
from raykit.runtime.console import RunConsole, quiet_ray_data
from raykit.runtime.failures import user_error
from raykit.runtime.logs import logger
from raykit.runtime.storage import absolute, is_uri, prepare_output_dir
from raykit.tools.model_card import finetune_card
from raykit.training.checkpoint import export_model
from raykit.training.recipe import WORKER_GROUP_KEY, plan_steps, train_loop_per_worker
from raykit.training.tracking import tracking_dir, tracking_env

# Ray Train's controller polls its workers every 2 s by default; a run's end takes a few polls
# (2 s more of every run's tail than at 0.5 s) and each checkpoint report waits for one. Polling
# 4x as often is a few small actor calls a second. Set by the driver, it reaches the controller.
CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


@dataclass
class FinetuneResult:
    output_dir: str
    best_metrics: dict[str, float]
    summary: dict[str, Any]
    checkpoint_path: str | None
    logging_dir: str | None = None  # TensorBoard/W&B files, with --report_to


def _names(paths: list[str]) -> str:
    return ", ".join(f"`{os.path.basename(os.path.normpath(p))}`" for p in paths)


def check_run_paths(cfg: FinetuneConfig) -> None:
    """One-line errors for a missing model or an output that cannot be written, before Ray."""
    check_reranker(cfg.model_name_or_path, cfg, "model_name_or_path", training=True)
    prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    if cfg.storage_path and not is_uri(cfg.storage_path):
        storage, output = absolute(cfg.storage_path), absolute(cfg.output_dir)
        if os.path.commonpath([storage, output]) == output:
            raise ConfigError(
                "storage_path: must not be inside output_dir, which the export replaces"
            )


def check_inputs(cfg: FinetuneConfig) -> None:
    """Everything that can be checked before Ray starts, each failure one line: options and
    hardware, the model, the output folder, the data files."""
    cfg.check_paths()
    cfg.check_files()
    cfg.check_hardware(cfg.use_gpu)
    check_run_paths(cfg)


def finetune(
    cfg: FinetuneConfig,
    callbacks: list | None = None,
    console: bool = True,
    tracking_group: str | None = None,
    launched_at: float | None = None,
) -> FinetuneResult:
    """Validate data, run the TorchTrainer, export the best checkpoint to `cfg.output_dir`.

    `callbacks` are Ray Train `UserCallback`s (a Tune trial passes `TuneReportCallback`).
    `console`: show rank 0's events here (a Tune trial, whose output nobody sees, passes False).
    `tracking_group`: the sweep a trial belongs to, for the trackers.
    `launched_at`: when the user launched the run (the CLI passes its process's start), which
    the start-up split counts from; by default, this call.
    """
    launched_at = launched_at or time.time()
    check_inputs(cfg)
    init_ray(cfg.ray_cpus())
    startup = {"ray": time.time() - launched_at}
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_data()
    cfg = dataclasses.replace(
        cfg,
        train_data=[absolute(p) for p in cfg.train_data],
        eval_data=[absolute(p) for p in cfg.eval_data],
        output_dir=absolute(cfg.output_dir),
        storage_path=absolute(cfg.storage_path) if cfg.storage_path else None,
        run_name=cfg.run_name or time.strftime("raykit-finetune-%Y%m%d-%H%M%S"),
        logging_dir=absolute(cfg.logging_dir) if cfg.logging_dir else None,
    )
    storage = cfg.storage_path or os.path.expanduser("~/ray_results")
    lock = hold_run_lock(f"{storage}/{cfg.run_name}", repr(cfg.run_name))
    try:
        with RunConsole(lock) if console else nullcontext():
            events = lock if console else None  # the lock is also the run's mailbox
            return _train_and_export(cfg, callbacks, launched_at, startup, events, tracking_group)
    finally:
        ray.kill(lock)


def _train_and_export(
    cfg: FinetuneConfig,
    callbacks: list | None,
    launched_at: float,
    startup: dict[str, float],
    events: Any = None,
    tracking_group: str | None = None,
) -> FinetuneResult:
    train, eval_groups, eval_lines = _read_datasets(cfg)
    datasets = {"train": train.dataset}
    startup["data"] = time.time() - launched_at
    plan = plan_steps(cfg, train.rows, train.bytes)
    dropped = train.rows - plan.groups_per_worker * cfg.num_workers
    if dropped:
        logger.info(
            f"{dropped} group(s) per epoch left out so that {cfg.num_workers} workers "
            "get equal shards"
        )
    device = "cuda" if cfg.use_gpu else "cpu"
    logger.info(
        f"training on {cfg.num_workers} worker(s) x {'1 GPU' if cfg.use_gpu else 'CPU'}, "
        f"{describe_precision(cfg.precision, device)}"
    )
    loop_config = {
        "cfg": dataclasses.asdict(cfg),
        "plan": dataclasses.asdict(plan),
        "model_path": resolve_model_path(cfg.model_name_or_path),
        "launched_at": launched_at,
        "startup": startup,
        "eval_groups": eval_groups,
        "validation": train.pending,
        "events": events,
        "tracking_group": tracking_group,
        "tracking_env": tracking_env() if cfg.backends else {},
    }
    validated_beside = bool(train.pending)
    result = _fit(_trainer(cfg, loop_config, datasets, callbacks))
    summary = result.return_value or {}
    data_error = summary.pop("data_error", None)
    train_report = train.finish()  # an unreadable file raises its DataError here
    if data_error:
        raise_for_invalid(train_report, INVALID_HINT)
        raise DataError(data_error)
    if validated_beside:
        logger.info(f"train data: {train_report.summary()}")
    data_lines = [f"training: {train_report.summary()}: {_names(cfg.train_data)}", *eval_lines]
    checkpoint, best_metrics = _best_checkpoint(cfg, result)
    data_lines.append(
        f"{summary.get('pairs_trained', 0)} (query, passage) pairs trained in "
        f"{summary.get('steps', 0)} steps, groups of {cfg.train_group_size}"
    )
    card = finetune_card(cfg, summary, best_metrics, data_lines)
    export_model(
        checkpoint,
        cfg.output_dir,
        {**summary, "best_metrics": best_metrics},
        card,
        cfg.save_merged_model,
        cfg.trust_remote_code,
    )
    logger.info(f"best model written to {cfg.output_dir}")
    logging_dir = tracking_dir(cfg) if cfg.backends else None
    return FinetuneResult(cfg.output_dir, best_metrics, summary, checkpoint.path, logging_dir)


def _read_datasets(cfg: FinetuneConfig) -> tuple[GroupStream, Any, list[str]]:
    """The train data (validated beside training), the eval groups (read here and put in the
    object store: small, and every worker holds all of them) and the card's eval line."""
    train = stream_groups(cfg.train_data, cfg.skip_invalid)
    logger.info(f"train data: {train.describe()}")
    if not cfg.eval_data:
        return train, None, []
    groups, report = collect_groups(cfg.eval_data)
    if not cfg.skip_invalid:
        raise_for_invalid(report, " in evaluation data (use --skip_invalid to skip them)")
    if not groups:
        raise DataError(f"no valid groups in {', '.join(cfg.eval_data)}")
    logger.info(f"eval data: {report.summary()}")
    return train, ray.put(groups), [f"evaluation: {report.summary()}: {_names(cfg.eval_data)}"]


def _fit(trainer: TorchTrainer) -> Any:
    """`trainer.fit()`, with a worker's data or option error raised as itself (one line)."""
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        for failure in (getattr(exc, "worker_failures", None) or {}).values():
            if (error := user_error(failure)) is not None:
                raise error from None
        raise
    if result.error:
        raise result.error
    return result


def _trainer(
    cfg: FinetuneConfig, loop_config: dict[str, Any], datasets: dict[str, Any], callbacks: Any
) -> TorchTrainer:
    """The `TorchTrainer` that runs the recipe on `cfg.num_workers` workers."""
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)  # the user's value wins
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # deterministic shards: resuming mid-epoch skips the same rows
    resources = {
        "CPU": cfg.cpus_per_worker,
        **({"GPU": 1} if cfg.use_gpu else {}),
        **cfg.extra_worker_resources,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.save_total_limit,
                checkpoint_score_attribute=cfg.metric_for_best_model if cfg.eval_data else None,
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": ingest}),
    )


def _best_checkpoint(cfg: FinetuneConfig, result: Any) -> tuple[Any, dict[str, Any]]:
    """The checkpoint to export (the best by `metric_for_best_model` with eval data, else the
    last) and its metrics, without Tune's bookkeeping."""
    checkpoint, best_metrics = result.checkpoint, dict(result.metrics or {})
    if cfg.eval_data and result.best_checkpoints:
        checkpoint, best_metrics = max(
            result.best_checkpoints,
            key=lambda cm: cm[1].get(cfg.metric_for_best_model, float("-inf")),
        )
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return checkpoint, {k: v for k, v in best_metrics.items() if k != WORKER_GROUP_KEY}

"""Hyper-parameter sweeps with Ray Tune (Train V2 pattern).

Each Tune trial is a function trainable that runs the same `finetune` as `raykit finetune` with
the trial's config, forwarding every Ray Train report to Tune with `TuneReportCallback`. ASHA
stops weak trials early on the eval metric; the best trial's best checkpoint is exported to
`output_dir/best` in Hugging Face format.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.basic_variant import BasicVariantGenerator

from raykit.config import FinetuneConfig, TuneConfig, parse_search
from raykit.core.spec import check_reranker
from raykit.runtime.cluster import init_ray
from raykit.runtime.console import format_eta, text_table
from raykit.runtime.logs import is_verbose, logger
from raykit.runtime.storage import absolute, filesystem, join, prepare_output_dir
from raykit.tools.model_card import finetune_card
from raykit.training.checkpoint import export_model
from raykit.training.launch import finetune
from raykit.training.recipe import WORKER_GROUP_KEY

CHECKPOINT_PATH_KEY = "checkpoint_path"  # set by TuneReportCallback on checkpoint reports
TRIAL_DRIVER_CPU = 0.01  # a trial only waits on its TorchTrainer


def release_placement_group(group_hex: str | None) -> None:
    """Remove a finished run's worker placement group if Ray Train left it behind.

    With Ray 2.60, a run inside a Tune trial can end (or be stopped by ASHA) with its worker
    group's placement group still reserved: the trial actor exits before the controller's cleanup.
    In a long-lived driver such as a sweep those CPUs/GPUs would be lost to every later trial.
    Every report carries the group's id (`WORKER_GROUP_KEY`) so the sweep can free it.
    """
    if not group_hex:
        return
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_hex)))
    try:
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
    except Exception as exc:  # never fail a finished run over cleanup
        logger.warning(f"could not release placement group {group_hex}: {exc}")


def search_space(specs: list[str]) -> dict[str, Any]:
    """Tune's param space for `--search KEY=DIST:ARGS` specs (parsed and checked by config)."""
    space: dict[str, Any] = {}
    for key, dimension in parse_search(specs).items():
        if dimension.distribution == "loguniform":
            space[key] = tune.loguniform(*dimension.values)
        elif dimension.distribution == "uniform":
            space[key] = tune.uniform(*dimension.values)
        elif dimension.distribution == "choice":
            space[key] = tune.choice(list(dimension.values))
        else:
            space[key] = tune.grid_search(list(dimension.values))
    return space


def default_max_concurrent_trials(cfg: TuneConfig) -> int:
    """How many trials the cluster can run at once: workers per trial + 1 CPU for data reads."""
    resources = ray.cluster_resources()
    per_trial = cfg.num_workers * cfg.cpus_per_worker + TRIAL_DRIVER_CPU
    trials = int((resources.get("CPU", 1) - 1) // per_trial)
    if cfg.use_gpu:
        trials = min(trials, int(resources.get("GPU", 0) // cfg.num_workers))
    return max(1, trials)


def _run_trial(
    trial_params: dict[str, Any], base: dict[str, Any], sweep_dir: str, sweep_name: str
) -> None:
    """One Tune trial: a full fine-tune whose reports are forwarded to Tune. Its console stays
    in the trial's own process: the sweep's driver shows the reports (`TrialProgress`)."""
    name = tune.get_context().get_trial_name()
    cfg = FinetuneConfig(**{**base, **trial_params})
    cfg = dataclasses.replace(
        cfg,
        run_name=name,
        storage_path=join(sweep_dir, "trials"),
        output_dir=join(sweep_dir, "trials", name, "model"),
        overwrite_output_dir=True,  # the sweep's own folder: a resumed trial exports again
        logging_dir=join(base["logging_dir"], name) if base.get("logging_dir") else None,
    )
    finetune(cfg, callbacks=[TuneReportCallback()], console=False, tracking_group=sweep_name)


class TrialProgress(tune.Callback):
    """The sweep's console: one line per trial report (step, loss, the metric) and per end."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        parts = [f"{trial}: step {result.get('step')}"]
        if "loss" in result:
            parts.append(f"loss {result['loss']:.4f}")
        if self.metric in result:
            parts.append(f"{self.metric} {result[self.metric]:.4f}")
        if "lr" in result:
            parts += [
                f"lr {result['lr']:.2e}",
                f"pairs/s {result['pairs_per_s']:.1f}",
                f"eta {format_eta(result['eta_s'])}",
            ]
        logger.info(" ".join(parts))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        logger.info(f"{trial}: done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        logger.warning(f"{trial}: failed (see trials.csv)")


class ReleaseWorkerGroups(tune.Callback):
    """Frees the worker placement group of every trial that ends (see release_placement_group)."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        release_placement_group((trial.last_result or {}).get(WORKER_GROUP_KEY))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        release_placement_group((trial.last_result or {}).get(WORKER_GROUP_KEY))


def _trial_rows(
    results: tune.ResultGrid, metric: str, param_keys: list[str], max_steps: int
) -> list[dict]:
    """One row per trial; STOPPED marks a trial ASHA ended before `max_steps`."""
    rows = []
    configs = {os.path.basename(t.path): t.config for t in _trials(results)}
    for result in results:
        frame = result.metrics_dataframe
        scores = frame[metric].dropna() if frame is not None and metric in frame else []
        steps = int(frame["step"].max()) if frame is not None and "step" in frame else 0
        status = "ERROR" if result.error else "OK"
        if status == "OK" and max_steps > 0 and steps < max_steps:
            status = "STOPPED"
        # A trial with no report yet has no config in its Result: take it from the trial.
        config = result.config or configs.get(os.path.basename(result.path), {})
        rows.append(
            {
                "trial": os.path.basename(result.path),
                **{k: config.get(k) for k in param_keys},
                f"best_{metric}": round(float(max(scores)), 4) if len(scores) else None,
                "steps": steps,
                "status": status,
                "error": str(result.error).splitlines()[0][:200] if result.error else "",
            }
        )
    return rows


def _trials(results: tune.ResultGrid) -> list:
    """The Tune trials behind a ResultGrid (their configs exist even before a first report)."""
    analysis = getattr(results, "_experiment_analysis", None)
    return list(getattr(analysis, "trials", None) or [])


def _best_checkpoint(
    results: tune.ResultGrid, metric: str, storage: str
) -> tuple[Checkpoint, dict] | None:
    """The kept checkpoint with the highest `metric` across all trials and reports.

    Each trial keeps only its best and latest checkpoints (`save_total_limit`), so reports whose
    checkpoint was since deleted are passed over. The reported paths are paths on the sweep's
    storage filesystem (no `s3://`), so they are opened there.
    """
    fs, _ = filesystem(storage)
    best = None
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or CHECKPOINT_PATH_KEY not in frame or metric not in frame:
            continue
        rows = frame.dropna(subset=[CHECKPOINT_PATH_KEY, metric])
        for _, row in rows.iterrows():
            if best is not None and row[metric] <= best[1][metric]:
                continue
            checkpoint = Checkpoint(row[CHECKPOINT_PATH_KEY], filesystem=fs)
            info = checkpoint.filesystem.get_file_info(checkpoint.path)
            if info.type != pafs.FileType.NotFound:
                best = (checkpoint, row.to_dict())
    return best


def run_sweep(cfg: TuneConfig) -> dict[str, Any]:
    """Run (or resume) the sweep; write trials.csv/json and the best model to output_dir/best."""
    cfg.check_paths()
    cfg.check_hardware(cfg.use_gpu)
    space = search_space(cfg.search)
    # Log reports before a trial's first evaluation carry no eval metric; ASHA skips them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    output_dir = absolute(cfg.output_dir)
    storage = absolute(cfg.storage_path) if cfg.storage_path else join(output_dir, "ray")
    # The sweep's own state may live in output_dir/ray: re-running resumes it, but earlier
    # results beside it (trials.*, best/) are only replaced with --overwrite_output_dir.
    prepare_output_dir(output_dir, cfg.overwrite_output_dir, keep={"ray"})
    if "model_name_or_path" not in space:
        check_reranker(cfg.model_name_or_path, cfg, "model_name_or_path", training=True)
    init_ray(cfg.num_workers * cfg.cpus_per_worker)
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FinetuneConfig)}
    base.update(
        train_data=[absolute(p) for p in cfg.train_data],
        eval_data=[absolute(p) for p in cfg.eval_data],
        logging_dir=absolute(cfg.logging_dir) if cfg.logging_dir else None,
    )
    results = _tuner(cfg, space, base, storage).fit()
    rows = _trial_rows(results, cfg.metric_for_best_model, sorted(space), cfg.max_steps)
    _write_trials(output_dir, rows)
    print(format_table(rows), flush=True)
    best = _best_checkpoint(results, cfg.metric_for_best_model, storage)
    if best is None:
        raise RuntimeError("no trial produced a checkpoint with the metric; see trials.csv")
    best_dir = _export_best(cfg, base, space, rows, *best, join(output_dir, "best"))
    metrics = best[1]
    metric = cfg.metric_for_best_model
    logger.info(f"best {metric}={metrics[metric]:.4f}; model written to {best_dir}")
    return {"trials": rows, "best_metrics": metrics, "best_dir": best_dir}


def _tuner(cfg: TuneConfig, space: dict, base: dict, storage: str) -> tune.Tuner:
    """A new Tuner over `space`, or the sweep of the same name restored from `storage`."""
    name = cfg.run_name or "sweep"
    sweep_dir = join(storage, name)
    # The trial itself only waits on its TorchTrainer: a token CPU share, so that the
    # trainer's workers (and Ray Data reads) get the real CPUs.
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=base, sweep_dir=sweep_dir, sweep_name=name),
        {"cpu": TRIAL_DRIVER_CPU},
    )
    if tune.Tuner.can_restore(sweep_dir):
        logger.info(f"resuming sweep {sweep_dir}")
        return tune.Tuner.restore(sweep_dir, trainable, resume_errored=False)
    scheduler = None
    if cfg.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="step",
            max_t=max(1, _planned_steps_hint(cfg)),
            grace_period=cfg.grace_period or cfg.eval_steps or 1,
            reduction_factor=cfg.reduction_factor,
        )
    concurrent = cfg.max_concurrent_trials or default_max_concurrent_trials(cfg)
    logger.info(f"sweep {name}: {cfg.num_samples} sample(s), {concurrent} at a time")
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=cfg.metric_for_best_model,
            mode="max",
            num_samples=cfg.num_samples,
            scheduler=scheduler,
            # Seeded sampling; it also enforces the concurrency limit.
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=2 if is_verbose() else 0,
            callbacks=[ReleaseWorkerGroups(), TrialProgress(cfg.metric_for_best_model)],
        ),
    )


def _write_trials(output_dir: str, rows: list[dict]) -> None:
    """trials.json and trials.csv in `output_dir` (local or a URI)."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    fs, root = filesystem(output_dir)
    fs.create_dir(root, recursive=True)
    for file_name, text in (
        ("trials.json", json.dumps(rows, indent=2, default=str)),
        ("trials.csv", table.getvalue()),
    ):
        with fs.open_output_stream(f"{root}/{file_name}") as f:
            f.write(text.encode())


def _export_best(
    cfg: TuneConfig,
    base: dict,
    space: dict,
    rows: list[dict],
    checkpoint: Checkpoint,
    metrics: dict,
    best_dir: str,
) -> str:
    """Export the best trial's checkpoint to `best_dir` with a card naming its settings."""
    params = {
        key.split("/", 1)[1]: value
        for key, value in metrics.items()
        if key.startswith("config/") and key.split("/", 1)[1] in base
    }
    trial_cfg = FinetuneConfig(**{**base, **params, "output_dir": best_dir})
    data = [
        f"training: {', '.join(cfg.train_data)}",
        f"evaluation: {', '.join(cfg.eval_data)}",
        f"sweep: {len(rows)} trials over {', '.join(sorted(space))} (see trials.csv)",
    ]
    line = f"The best of {len(rows)} trials of a sweep: a reranker fine-tuned"
    card = finetune_card(trial_cfg, {"steps": metrics.get("step")}, metrics, data, line)
    export_model(
        checkpoint,
        best_dir,
        {"best_metrics": metrics, "trials": rows},
        card,
        trial_cfg.save_merged_model,
        trial_cfg.trust_remote_code,
    )
    return best_dir


def _planned_steps_hint(cfg: TuneConfig) -> int:
    """ASHA's max_t: max_steps when set, else a large bound (trials end on their own)."""
    return cfg.max_steps if cfg.max_steps > 0 else 10**9


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if c != "error" or any(r["error"] for r in rows)]
    return text_table([columns, *([str(r[c]) for c in columns] for r in rows)])

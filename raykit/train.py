"""Fine-tuning a cross-encoder with Ray Train (one readable loop, torchtune-recipe style).

`finetune(cfg)` runs on the driver: it validates the data, plans the steps, launches a
`TorchTrainer` and exports the best checkpoint to `cfg.output_dir` in Hugging Face format.
`train_loop_per_worker` is the loop each Ray Train worker runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from transformers import get_linear_schedule_with_warmup

from raykit.cluster import hold_run_lock, init_ray
from raykit.config import ConfigError, FinetuneConfig, resolve_model_path
from raykit.data import DataError, read_groups, rows_from_batch, sample_group, tokenize_pairs
from raykit.evaluate import mean_metrics, metric_sums
from raykit.model import (
    CrossEncoder,
    autocast_context,
    check_model,
    distillation_loss,
    group_softmax_loss,
    load_model_and_tokenizer,
    make_chunks,
    predict_logits,
)
from raykit.storage import absolute, is_uri, prepare_output_dir, publish_dir

TRAINER_STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "raykit_finetune.json"
SUMMARY_FILE = "train_summary.json"
BEST_METRIC = "ndcg@10"


@dataclass
class TrainPlan:
    """Step arithmetic fixed on the driver so every worker runs the same number of steps."""

    groups: int
    groups_per_worker: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int


def plan_steps(cfg: FinetuneConfig, valid_groups: int) -> TrainPlan:
    # Ray Train's streaming split gives every worker the same number of rows (it drops at most
    # num_workers - 1 rows), so the per-worker batch count is identical and DDP never hangs.
    per_worker = valid_groups // cfg.num_workers
    batch = cfg.per_device_train_batch_size
    micro = per_worker // batch if cfg.dataloader_drop_last else math.ceil(per_worker / batch)
    if micro == 0:
        raise ConfigError(
            f"per_device_train_batch_size: {valid_groups} groups over {cfg.num_workers} worker(s) "
            f"give {per_worker} per worker, fewer than one batch of {batch}"
        )
    steps_per_epoch = math.ceil(micro / cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.num_train_epochs
    return TrainPlan(
        groups=valid_groups,
        groups_per_worker=per_worker,
        micro_batches_per_epoch=micro,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=math.ceil(total / steps_per_epoch),
        warmup_steps=int(cfg.warmup_ratio * total),
    )


# ---------------------------------------------------------------------------- worker side


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def _evaluate(
    encoder: CrossEncoder,
    tokenizer: Any,
    groups: list[dict],
    cfg: FinetuneConfig,
    device: torch.device,
) -> dict[str, float]:
    """Each worker ranks its share of the groups; the metric sums are all-reduced."""
    ctx = ray.train.get_context()
    mine = groups[ctx.get_world_rank() :: ctx.get_world_size()]
    encoder.eval()

    def score(pairs: list[list[str]]) -> list[float]:
        return predict_logits(
            encoder.hf_model, tokenizer, pairs, max_len=cfg.max_len,
            batch_size=cfg.eval_batch_size, device=device,
            fp16=cfg.fp16 and device.type == "cuda", bf16=cfg.bf16 and device.type == "cuda",
            query_max_len=cfg.effective_query_max_len,
            passage_max_len=cfg.effective_passage_max_len,
        )  # fmt: skip

    sums = metric_sums(mine, score)
    names = sorted(sums)
    reduced = dict(zip(names, _all_reduce_sum([sums[n] for n in names], device), strict=True))
    encoder.train()
    return mean_metrics(reduced)


def _save_checkpoint(
    directory: str,
    encoder: CrossEncoder,
    tokenizer: Any,
    cfg: FinetuneConfig,
    state: dict[str, Any],
) -> None:
    encoder.hf_model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    torch.save(state, os.path.join(directory, TRAINER_STATE_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def _rng_state() -> dict[str, Any]:
    """Dropout and other torch/numpy/python randomness; group sampling is seeded per batch."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _micro_batches(
    shard: Any, cfg: FinetuneConfig, epoch: int, skip: int, limit: int
) -> Iterator[tuple[int, list[dict]]]:
    """This worker's micro-batches of records for one epoch, skipping the first `skip`."""
    batches = shard.iter_batches(
        batch_size=cfg.per_device_train_batch_size,
        batch_format="numpy",
        drop_last=cfg.dataloader_drop_last,
        local_shuffle_buffer_size=max(64, 4 * cfg.per_device_train_batch_size),
        local_shuffle_seed=cfg.seed + epoch,
    )
    for index, batch in enumerate(batches):
        if index >= limit:
            break
        if index >= skip:
            yield index, rows_from_batch(batch)


WORKER_GROUP_KEY = "worker_placement_group"


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: DDP model, AMP, accumulation, eval, checkpoints, resume."""
    cfg = FinetuneConfig(**loop_config["cfg"])
    plan = TrainPlan(**loop_config["plan"])
    launched_at = loop_config["launched_at"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {}
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            hf_model, tokenizer = load_model_and_tokenizer(ckpt_dir, cfg.trust_remote_code)
            state = torch.load(os.path.join(ckpt_dir, TRAINER_STATE_FILE), weights_only=False)
    else:
        hf_model, tokenizer = load_model_and_tokenizer(
            loop_config["model_path"], cfg.trust_remote_code
        )
    if cfg.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    encoder = CrossEncoder(hf_model)

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    params = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in params if not n.endswith(no_decay)],
             "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
    )  # fmt: skip
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
    step = state.get("step", 0)
    history: dict[str, Any] = state.get("history", {"eval": [], "loss": []})
    resumed_from_step = step

    model = ray.train.torch.prepare_model(encoder)  # moves to device, wraps in DDP if world > 1
    encoder = model.module if hasattr(model, "module") else model
    is_ddp = model is not encoder
    worker_nodes = [ray.get_runtime_context().get_node_id()]
    if torch.distributed.is_initialized():
        worker_nodes = [None] * world
        torch.distributed.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())

    eval_groups = []
    if "eval" in loop_config["datasets"]:
        eval_shard = ray.train.get_dataset_shard("eval")
        for batch in eval_shard.iter_batches(batch_size=256, batch_format="numpy"):
            eval_groups += rows_from_batch(batch)
    train_shard = ray.train.get_dataset_shard("train")

    def log(message: str) -> None:
        if rank == 0:
            print(f"[raykit] {message}", flush=True)

    def evaluate(label: str) -> dict[str, float]:
        metrics = _evaluate(encoder, tokenizer, eval_groups, cfg, device)
        history["eval"].append({"step": step, **metrics})
        log(f"eval {label} step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    group = ray.util.get_current_placement_group()
    group_hex = group.id.hex() if group is not None else None

    def report(metrics: dict[str, Any], save: bool) -> None:
        metrics = {"step": step, "epoch": step / plan.steps_per_epoch, **metrics}
        metrics[WORKER_GROUP_KEY] = group_hex
        if history["eval"]:
            metrics.update({k: v for k, v in history["eval"][-1].items() if k != "step"})
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _save_checkpoint(tmp, encoder, tokenizer, cfg, {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "history": history,
                    "rng": _rng_state(),
                })  # fmt: skip
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None
            )

    if eval_groups and step == 0 and cfg.eval_on_start:
        history["eval_before"] = evaluate("before training")
    if step:
        log(f"resumed from checkpoint at step {step}/{plan.total_steps}")
    log(f"workers on {len(set(worker_nodes))} node(s): {worker_nodes}")
    log(
        f"training {plan.total_steps} steps ({plan.steps_per_epoch}/epoch, {plan.epochs} epoch(s)),"
        f" {world} worker(s) on {device.type}, {plan.groups_per_worker} groups per worker per epoch"
        + (
            f", {torch.distributed.get_backend()} backend"
            if torch.distributed.is_initialized()
            else ""
        )
    )

    save_every = cfg.save_steps or cfg.eval_steps
    window = np.zeros(6)  # loss sum, micro-batches, groups, real tokens, padded tokens, seconds
    totals = {"pairs": 0, "seconds": 0.0}
    first_step_at = None
    last_saved = last_evaluated = step
    group_size = cfg.train_group_size
    accum = cfg.gradient_accumulation_steps
    model.train()

    while step < plan.total_steps:
        epoch = step // plan.steps_per_epoch
        done_in_epoch = step - epoch * plan.steps_per_epoch
        last_micro = plan.micro_batches_per_epoch - 1
        started = time.perf_counter()
        for micro, records in _micro_batches(
            train_shard, cfg, epoch, done_in_epoch * accum, plan.micro_batches_per_epoch
        ):
            rng = np.random.default_rng([cfg.seed, epoch, rank, micro])
            groups = [sample_group(r, group_size, rng) for r in records]
            encodings = tokenize_pairs(
                tokenizer,
                [g.query for g in groups for _ in g.passages],
                [p for g in groups for p in g.passages],
                cfg.max_len,
                cfg.effective_query_max_len,
                cfg.effective_passage_max_len,
            )
            chunks, order, pad_tokens = make_chunks(
                encodings, cfg.forward_token_budget, tokenizer.pad_token_id, device
            )
            boundary = (micro + 1) % accum == 0 or micro == last_micro
            with model.no_sync() if is_ddp and not boundary else nullcontext():
                with autocast_context(device, cfg.fp16, cfg.bf16):
                    logits = model(chunks, order)
                loss = group_softmax_loss(logits, group_size)
                teacher_rows = [i for i, g in enumerate(groups) if g.teacher_scores is not None]
                if teacher_rows and cfg.distill_weight > 0:
                    teacher = torch.tensor(
                        [groups[i].teacher_scores for i in teacher_rows], device=device
                    )
                    student = logits.view(-1, group_size)[teacher_rows]
                    loss = loss + cfg.distill_weight * distillation_loss(
                        student, teacher, group_size, cfg.distill_temperature
                    )
                scaler.scale(loss / accum).backward()

            tokens = sum(len(e["input_ids"]) for e in encodings)
            window += [loss.item(), 1, len(groups), tokens, tokens + pad_tokens, 0]
            totals["pairs"] += len(encodings)
            if not boundary:
                continue

            if cfg.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            window[5] += elapsed
            totals["seconds"] += elapsed
            if first_step_at is None:
                first_step_at = time.time()
                log(f"first step done {first_step_at - launched_at:.1f}s after launch")

            # Evaluate before the log report, so every report carries the freshest metrics.
            evaluate_now = bool(eval_groups) and (
                step == plan.total_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)
            )
            if evaluate_now:
                evaluate("final" if step == plan.total_steps else "")
                last_evaluated = step
            # One report per step: a scheduler such as ASHA may stop the trial on any report,
            # so a checkpoint due at this step travels with that step's metrics.
            save_now = step == plan.total_steps or bool(save_every and step % save_every == 0)
            log_metrics: dict[str, Any] = {}
            if step % cfg.logging_steps == 0 or step == plan.total_steps:
                loss_sum, n_micro, n_groups, real, padded, seconds = _all_reduce_sum(
                    list(window), device
                )
                seconds /= world
                log(
                    f"step {step}/{plan.total_steps} epoch {step / plan.steps_per_epoch:.2f} "
                    f"loss {loss_sum / n_micro:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                    f"groups/s {n_groups / seconds:.2f} "
                    f"pairs/s {n_groups * group_size / seconds:.1f} tokens/s {real / seconds:.0f} "
                    f"padding {1 - real / padded:.1%}"
                )
                window[:] = 0
                history["loss"].append({"step": step, "loss": loss_sum / n_micro})
                log_metrics = {"loss": loss_sum / n_micro, "lr": scheduler.get_last_lr()[0]}
            if log_metrics or save_now:
                report(log_metrics, save=save_now)
            if save_now:
                last_saved = step
            if step >= plan.total_steps:
                break
            started = time.perf_counter()
        if step == epoch * plan.steps_per_epoch + done_in_epoch:
            raise RuntimeError(f"worker {rank}: epoch {epoch} yielded no training batches")

    if eval_groups and last_evaluated != step:
        evaluate("final")
    if last_saved != step:
        report({}, save=True)
    return {
        "steps": step,
        "resumed_from_step": resumed_from_step,
        "loss": history["loss"],
        "eval_before": history.get("eval_before"),
        "eval": history["eval"],
        "pairs_trained": totals["pairs"] * world,
        "train_seconds": totals["seconds"],
        "time_to_first_step_s": (first_step_at - launched_at) if first_step_at else None,
        "worker_nodes": worker_nodes,  # Ray node id of each rank
    }


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
        print(f"[raykit] could not release placement group {group_hex}: {exc}", flush=True)


# ---------------------------------------------------------------------------- driver side


@dataclass
class FinetuneResult:
    output_dir: str
    best_metrics: dict[str, float]
    summary: dict[str, Any]
    checkpoint_path: str | None


def export_model(checkpoint: Checkpoint, output_dir: str, summary: dict[str, Any]) -> None:
    """Publish a checkpoint's Hugging Face files (not the optimizer state) as `output_dir`, with
    `train_summary.json` (loss and eval history, throughput). The folder is replaced as a whole
    and appears complete or not at all (see `publish_dir`)."""

    def write(folder: str) -> None:
        with checkpoint.as_directory() as ckpt_dir:
            for name in os.listdir(ckpt_dir):
                src = os.path.join(ckpt_dir, name)
                if name == TRAINER_STATE_FILE:
                    continue
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(folder, name))
                else:
                    shutil.copy2(src, os.path.join(folder, name))
        with open(os.path.join(folder, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2, default=str)

    publish_dir(output_dir, write)


def check_run_paths(cfg: FinetuneConfig) -> None:
    """One-line errors for a missing model or an output that cannot be written, before Ray."""
    check_model(cfg.model_name_or_path, "model_name_or_path")
    prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    if cfg.storage_path and not is_uri(cfg.storage_path):
        storage, output = absolute(cfg.storage_path), absolute(cfg.output_dir)
        if os.path.commonpath([storage, output]) == output:
            raise ConfigError(
                "storage_path: must not be inside output_dir, which the export replaces"
            )


def finetune(cfg: FinetuneConfig, callbacks: list | None = None) -> FinetuneResult:
    """Validate data, run the TorchTrainer, export the best checkpoint to `cfg.output_dir`.

    `callbacks` are Ray Train `UserCallback`s (a Tune trial passes `TuneReportCallback`).
    """
    launched_at = time.time()
    cfg.validate()
    check_run_paths(cfg)
    init_ray(cfg.num_workers * cfg.cpus_per_worker)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = dataclasses.replace(
        cfg,
        train_data=[absolute(p) for p in cfg.train_data],
        eval_data=[absolute(p) for p in cfg.eval_data],
        output_dir=absolute(cfg.output_dir),
        storage_path=absolute(cfg.storage_path) if cfg.storage_path else None,
        run_name=cfg.run_name or time.strftime("raykit-finetune-%Y%m%d-%H%M%S"),
    )
    storage = cfg.storage_path or os.path.expanduser("~/ray_results")
    lock = hold_run_lock(f"{storage}/{cfg.run_name}", repr(cfg.run_name))
    try:
        return _train_and_export(cfg, callbacks, launched_at)
    finally:
        ray.kill(lock)


def _train_and_export(
    cfg: FinetuneConfig, callbacks: list | None, launched_at: float
) -> FinetuneResult:
    model_path = resolve_model_path(cfg.model_name_or_path)

    train_ds, train_report = read_groups(cfg.train_data, cfg.skip_invalid)
    print(f"[raykit] train data: {train_report.summary()}", flush=True)
    datasets = {"train": train_ds}
    if cfg.eval_data:
        eval_ds, eval_report = read_groups(cfg.eval_data, cfg.skip_invalid)
        print(f"[raykit] eval data: {eval_report.summary()}", flush=True)
        datasets["eval"] = eval_ds
    plan = plan_steps(cfg, train_report.valid_rows)
    dropped = train_report.valid_rows - plan.groups_per_worker * cfg.num_workers
    if dropped:
        print(
            f"[raykit] {dropped} group(s) per epoch left out so that {cfg.num_workers} workers "
            "get equal shards",
            flush=True,
        )

    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # deterministic shards: resuming mid-epoch skips the same rows
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {}),
                 **cfg.extra_worker_resources}  # fmt: skip
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": dataclasses.asdict(cfg),
            "plan": dataclasses.asdict(plan),
            "model_path": model_path,
            "launched_at": launched_at,
            "datasets": sorted(datasets),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),  # fmt: skip
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.save_total_limit,
                checkpoint_score_attribute=BEST_METRIC if cfg.eval_data else None,
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": ingest}),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    summary = result.return_value or {}

    checkpoint, best_metrics = result.checkpoint, dict(result.metrics or {})
    if cfg.eval_data and result.best_checkpoints:
        checkpoint, best_metrics = max(
            result.best_checkpoints, key=lambda cm: cm[1].get(BEST_METRIC, float("-inf"))
        )
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    best_metrics = {k: v for k, v in best_metrics.items() if k != WORKER_GROUP_KEY}
    export_model(checkpoint, cfg.output_dir, {**summary, "best_metrics": best_metrics})
    print(f"[raykit] best model written to {cfg.output_dir}", flush=True)
    return FinetuneResult(cfg.output_dir, best_metrics, summary, checkpoint.path)


__all__ = ["finetune", "FinetuneResult", "train_loop_per_worker", "plan_steps", "DataError"]

"""The fine-tuning recipe that runs on every Ray Train worker (torchtune-style): set up the
model, optimizer, data shard and evaluation, then train, evaluate, checkpoint and report."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import resource
import sys
import tempfile
import threading
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
from ray.train import Checkpoint

from raykit.config import ConfigError, FinetuneConfig
from raykit.core.adapters import add_lora, base_model_name, load_adapter, trainable_summary
from raykit.core.batching import make_chunks
from raykit.core.engine import InferenceEngine
from raykit.core.head import CrossEncoder
from raykit.core.loading import load_model_and_tokenizer, local_model_path, missing_head
from raykit.core.losses import distillation_loss, group_softmax_loss
from raykit.core.metrics import mean_metrics, metric_sums
from raykit.core.precision import resolve_dtype, torch_dtype
from raykit.core.prompts import tokenize_for
from raykit.core.spec import SpecRequest, resolve_spec
from raykit.data.groups import rows_from_batch, sample_group
from raykit.runtime.console import EventSender, quiet_ray
from raykit.runtime.logs import VERBOSE_ENV, quiet_libraries
from raykit.training.checkpoint import TRAINER_STATE_FILE, _save_checkpoint
from raykit.training.flops import ModelFlops, peak_flops
from raykit.training.fsdp import (
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    shard_model,
)
from raykit.training.tracking import Tracker, open_trackers, tracking_dir
from raykit.training.validation import ValidationWatch


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
    shuffle_rows: int = 64  # each worker's shuffle buffer, in groups (see `shuffle_rows`)


# Each epoch a worker shuffles its shard in a buffer of this many bytes of groups (a whole small
# shard: CQA's 360 groups a worker; 16384 CQA-sized groups of a large one), like HF's
# per-epoch shuffle where it fits. A larger buffer delays the first step (it fills first).
SHUFFLE_BUFFER_BYTES = 32 * 2**20
SHUFFLE_BUFFER_ROWS = (64, 16384)


def shuffle_rows(groups_per_worker: int, data_bytes: int, groups: int) -> int:
    """Groups in a worker's shuffle buffer: `SHUFFLE_BUFFER_BYTES` of them, within
    `SHUFFLE_BUFFER_ROWS`, never more than the worker's shard."""
    low, high = SHUFFLE_BUFFER_ROWS
    fitting = SHUFFLE_BUFFER_BYTES * groups // data_bytes if data_bytes > 0 else low
    return min(groups_per_worker, max(low, min(high, fitting)))


def plan_steps(cfg: FinetuneConfig, valid_groups: int, data_bytes: int = 0) -> TrainPlan:
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
        shuffle_rows=shuffle_rows(per_worker, data_bytes, valid_groups),
    )


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak lr, then linear decay to 0: transformers'
    `get_linear_schedule_with_warmup`, written here because importing transformers' optimization
    module also imports peft and torchao (seconds of every worker's start)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compile_for_training(encoder: CrossEncoder) -> None:
    """Inductor-compile the scoring of a chunk, forward and backward. Shapes are dynamic
    (chunks vary in pairs and length); the parameters and their names stay the eager model's,
    so checkpoints and exports are unchanged."""
    encoder.compile(dynamic=True)


def fused_adamw_supported(device: torch.device, params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel for the whole update) takes floating-point parameters on
    CPU and CUDA alike; elsewhere the default (foreach) implementation runs."""
    return device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


@dataclass
class ThroughputWindow:
    """What one worker did since the last log line; `all_reduce` sums it over the workers."""

    loss_sum: float = 0.0
    micro_batches: int = 0
    distill_loss_sum: float = 0.0  # the teacher-score KL term, within loss_sum
    distill_micro_batches: int = 0
    groups: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    def add(
        self,
        loss: float,
        groups: int,
        real_tokens: int,
        padded_tokens: int,
        distill_loss: float | None = None,
    ) -> None:
        self.loss_sum += loss
        self.micro_batches += 1
        if distill_loss is not None:
            self.distill_loss_sum += distill_loss
            self.distill_micro_batches += 1
        self.groups += groups
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens

    def all_reduce(self, device: torch.device, world_size: int) -> ThroughputWindow:
        """The sums over every worker; `seconds` is the workers' mean, as they run side by side."""
        names = [f.name for f in dataclasses.fields(self)]
        sums = _all_reduce_sum([getattr(self, n) for n in names], device)
        total = ThroughputWindow(**dict(zip(names, sums, strict=True)))
        total.seconds /= world_size
        return total

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.micro_batches)

    def rates(self, group_size: int) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {
            "pairs_per_s": self.groups * group_size / seconds,
            "tokens_per_s": self.real_tokens / seconds,
            "padding": 1 - self.real_tokens / max(1, self.padded_tokens),
        }


# Start-up stages in order, each timed from the end of the one before: what the driver does
# (from the launch: its imports and checks beside Ray's start; the data check) and then rank 0
# (Ray Train's controller, worker group and process group up; model loaded; optimizer, eval
# and data set up; eval_on_start; first step).
STARTUP_STAGES = {
    "ray": "launch and Ray",
    "data": "data check",
    "workers": "trainer and workers",
    "model": "model load",
    "setup": "set-up",
    "first_eval": "first eval",
    "first_step": "first step",
}


def format_startup(marks: dict[str, float]) -> str:
    """`Ray 4.1 s, data check 1.9 s, ...`: each stage's own seconds, in order."""
    parts, previous = [], 0.0
    for stage, label in STARTUP_STAGES.items():
        if stage in marks:
            parts.append(f"{label} {marks[stage] - previous:.1f} s")
            previous = marks[stage]
    return ", ".join(parts)


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
    shard: Any, cfg: FinetuneConfig, plan: TrainPlan, epoch: int, skip: int
) -> Iterator[tuple[int, list[dict]]]:
    """This worker's micro-batches of records for one epoch, skipping the first `skip`: its
    shard shuffled anew each epoch (seeded, so a resumed epoch repeats it)."""
    batches = shard.iter_batches(
        batch_size=cfg.per_device_train_batch_size,
        batch_format="numpy",
        drop_last=cfg.dataloader_drop_last,
        local_shuffle_buffer_size=max(plan.shuffle_rows, cfg.per_device_train_batch_size),
        local_shuffle_seed=cfg.seed + epoch,
    )
    for index, batch in enumerate(batches):
        if index >= plan.micro_batches_per_epoch:
            break
        if index >= skip:
            yield index, rows_from_batch(batch)


class FirstItemAhead:
    """An iterator whose first item is fetched on a thread from the moment it is made."""

    def __init__(self, items: Iterator[Any]):
        self._items = items
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._items))
        except StopIteration:
            pass
        except BaseException as exc:  # raised where the items are used
            self._error = exc

    def __iter__(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._items


# A run inside a Tune trial reports its worker group so the sweep can free it (see tune).
WORKER_GROUP_KEY = "worker_placement_group"
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class FinetuneRecipe:
    """The loop of one Ray Train worker, in the manner of a torchtune recipe: `setup` builds
    the model, optimizer and data (from the latest checkpoint when resuming); `train` runs
    `train_step` per micro-batch and `optimizer_step` per step, with `evaluate`, `log_progress`
    and `report` (which saves checkpoints) between steps."""

    def __init__(self, loop_config: dict[str, Any]):
        self.cfg = FinetuneConfig(**loop_config["cfg"])
        self.plan = TrainPlan(**loop_config["plan"])
        self.launched_at: float = loop_config["launched_at"]
        # Start-up marks, seconds after launch: the driver's (Ray, data check), then
        # this worker's as it gets there (see `STARTUP_STAGES`).
        self.startup: dict[str, float] = dict(loop_config.get("startup") or {})
        self._mark("workers")
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        os.environ[VERBOSE_ENV] = "1" if self.cfg.verbose else "0"
        quiet_libraries()
        quiet_ray()
        # Rank 0 speaks for the run: console events to the driver, metrics to the trackers.
        self.events = EventSender(loop_config.get("events"), enabled=self.rank == 0)
        self.trackers: list[Tracker] = []
        self.tracking_group: str | None = loop_config.get("tracking_group")
        self.tracking_env: dict[str, str] = loop_config.get("tracking_env") or {}
        self.device = ray.train.torch.get_device()
        # auto: fp32 on CPU, bf16 (fp16 where unsupported) autocast on GPU; a precision this
        # worker's CPU only emulates is refused (unless allowed) before the model loads.
        self.precision = resolve_dtype(
            self.cfg.precision, self.device.type, self.cfg.allow_slow_precision
        )
        self.autocast_dtype = torch_dtype(self.precision)
        self.step = 0
        self.resumed_from_step = 0
        self.history: dict[str, Any] = {"eval": [], "loss": []}
        self.window = ThroughputWindow()
        self.pairs_trained = 0
        self.flops_done = self.flops_seconds = 0.0  # over the logged windows, all workers
        self.train_seconds = 0.0
        self.first_step_at: float | None = None
        self.last_saved = self.last_evaluated = 0
        self.validation = ValidationWatch(
            loop_config.get("validation") or [],
            self.rank,
            lambda values: _all_reduce_sum(values, self.device),
        )
        self.data_error: str | None = None  # validation found bad rows: stop, export nothing

    # ------------------------------------------------------------------ set-up

    def setup(self, model_path: str, eval_groups: Any = None) -> None:
        cfg = self.cfg
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self._start_data()
        state = self._setup_model(model_path)
        self._mark("model")
        self._setup_peak_flops()
        self._setup_optimizer()
        if state:
            self._restore(state)
        self._setup_eval()
        self._setup_data(eval_groups)
        self._setup_trackers()
        self._mark("setup")

    def _mark(self, stage: str) -> None:
        self.startup[stage] = time.time() - self.launched_at

    def _setup_model(self, model_path: str) -> dict[str, Any]:
        """Load (or resume) the model and wrap it for the workers (DDP, or FSDP2 with
        `--fsdp`); returns the trainer state of the checkpoint resumed from, if any."""
        cfg = self.cfg
        # How the model scores (its saved spec, the options applied; the driver has reported
        # overrides): a decoder (causal LM) trains on its prompts, scored logit(yes) - logit(no).
        self.spec = resolve_spec(local_model_path(model_path), SpecRequest.of(cfg))
        self.template = self.spec.template
        hf_model, self.tokenizer, state = self._load_model(model_path)
        if not state and self.template is None and self.rank == 0:
            self._say_if_head_is_new(model_path)
        if cfg.gradient_checkpointing:
            hf_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.model_flops = ModelFlops.of(hf_model)
        encoder = CrossEncoder(hf_model, self.spec.yes_no_ids(self.tokenizer))
        if cfg.torch_compile:
            compile_for_training(encoder)
        if cfg.fsdp:  # shards over the workers (FSDP2)
            self.model = shard_model(encoder, self.device)
        else:  # moves to the device, and wraps in DDP when there is more than one worker
            self.model = ray.train.torch.prepare_model(encoder)
        self.encoder: CrossEncoder = getattr(self.model, "module", self.model)
        return state

    def _say_if_head_is_new(self, model_path: str) -> None:
        """Fine-tuning a base or embedding model creates its head: say so once (rank 0)."""
        if missing_head(local_model_path(model_path), self.cfg.trust_remote_code):
            name = self.cfg.model_name_or_path
            self.log(f"{name}: no reranker head yet; fine-tuning creates one")

    def _setup_peak_flops(self) -> None:
        """The workers' summed peak for this precision's matmuls, the denominator of MFU."""
        peak = peak_flops(self.device, self.autocast_dtype or torch.float32)
        self.peak_source = peak.source
        self.peak_flops = _all_reduce_sum([peak.flops_per_s], self.device)[0]

    def _setup_optimizer(self) -> None:
        """AdamW (no decay on biases and norms), linear warm-up/decay, and a grad scaler that
        is only enabled for fp16."""
        cfg = self.cfg
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": [p for n, p in params if not n.endswith(NO_DECAY)],
                    "weight_decay": cfg.weight_decay,
                },
                {"params": [p for n, p in params if n.endswith(NO_DECAY)], "weight_decay": 0.0},
            ],
            lr=cfg.learning_rate,
            fused=fused_adamw_supported(self.device, [p for _, p in params]),
        )
        self.scheduler = linear_schedule(
            self.optimizer, self.plan.warmup_steps, self.plan.total_steps
        )
        scaler: Any = torch.amp.GradScaler
        if cfg.fsdp:  # imported only here: torch.distributed.fsdp takes a second to import
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as scaler
        self.scaler = scaler(self.device.type, enabled=self.precision == "float16")

    def _setup_eval(self) -> None:
        """Evaluation scores through the inference engine, under the training precision."""
        cfg = self.cfg
        self.eval_engine = InferenceEngine(
            self.encoder.hf_model,
            self.tokenizer,
            device=self.device,
            precision=self.precision,
            autocast_dtype=self.autocast_dtype,
            spec=self.spec,
            token_budget=cfg.forward_token_budget,
            max_batch_size=cfg.eval_batch_size,
            inference_mode=not cfg.fsdp,
        )

    def _start_data(self) -> None:
        """This worker's training shard; a fresh run starts reading its first epoch now, on a
        thread, so that Ray Data's split coordinator, read tasks and first blocks are under way
        while the model loads and evaluates (seconds of the first step). A resumed run knows
        where to start only from its checkpoint."""
        self.train_shard = ray.train.get_dataset_shard("train")
        self.first_epoch: FirstItemAhead | None = None
        if ray.train.get_checkpoint() is None:
            self.first_epoch = FirstItemAhead(
                _micro_batches(self.train_shard, self.cfg, self.plan, 0, 0)
            )

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[int, list[dict]]]:
        """(micro-batch index, records) of one epoch from its `skip`-th micro-batch on."""
        if self.first_epoch is not None and (epoch, skip) == (0, 0):
            batches, self.first_epoch = self.first_epoch, None
            return iter(batches)
        return _micro_batches(self.train_shard, self.cfg, self.plan, epoch, skip)

    def _setup_data(self, eval_groups: Any) -> None:
        """This worker's training shard, the eval groups (an object-store reference from the
        driver), and where the workers landed."""
        self.worker_nodes = self._gather_node_ids()
        self.eval_groups: list[dict] = ray.get(eval_groups) if eval_groups is not None else []
        group = ray.util.get_current_placement_group()
        self.group_hex = group.id.hex() if group is not None else None

    def _setup_trackers(self) -> None:
        """TensorBoard / MLflow / W&B, opened by rank 0 only."""
        cfg = self.cfg
        if self.rank == 0 and cfg.backends:
            os.environ.update(self.tracking_env)
            self.trackers = open_trackers(
                cfg.backends,
                cfg.run_name or "raykit",
                tracking_dir(cfg),
                dataclasses.asdict(cfg),
                self.tracking_group,
            )

    def _load_model(self, model_path: str) -> tuple[Any, Any, dict[str, Any]]:
        """The model to train and the trainer state: from the latest checkpoint if there is one.
        With LoRA the checkpoint holds the adapter, which is loaded onto the base."""
        cfg, decoder = self.cfg, self.template is not None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint and not cfg.use_lora:
            with checkpoint.as_directory() as folder:
                hf_model, tokenizer = load_model_and_tokenizer(
                    folder, cfg.trust_remote_code, decoder, allow_untrained_head=True, quiet=True
                )
                state = torch.load(os.path.join(folder, TRAINER_STATE_FILE), weights_only=False)
            return hf_model, tokenizer, state
        # LoRA trains only the adapters: the frozen base can stay in the autocast dtype (half
        # the memory), while the trainable parameters are kept in fp32.
        base_dtype = (self.autocast_dtype or torch.float32) if cfg.use_lora else torch.float32
        # Fine-tuning a base model creates its head (the driver has said so).
        hf_model, tokenizer = load_model_and_tokenizer(
            model_path, cfg.trust_remote_code, decoder, base_dtype, True, quiet=True
        )
        if not cfg.use_lora:
            return hf_model, tokenizer, {}
        state: dict[str, Any] = {}
        if checkpoint:
            with checkpoint.as_directory() as folder:
                hf_model = load_adapter(hf_model, folder, trainable=True)
                state = torch.load(os.path.join(folder, TRAINER_STATE_FILE), weights_only=False)
        else:
            hf_model = add_lora(
                hf_model,
                decoder=decoder,
                rank=cfg.lora_rank,
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules,
                base_name=base_model_name(cfg.model_name_or_path),
            )
            self.log(
                f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g}: {trainable_summary(hf_model)}"
            )
        for param in hf_model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        return hf_model, tokenizer, state

    def _restore(self, state: dict[str, Any]) -> None:
        if self.cfg.fsdp:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # One state per rank; a run resumed on a different number of workers reuses rank 0's.
        states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        _set_rng_state(states[self.rank] if len(states) == self.world_size else states[0])
        self.step = self.resumed_from_step = self.last_saved = self.last_evaluated = state["step"]
        self.history = state["history"]

    def _gather_node_ids(self) -> list[str | None]:
        """The Ray node id of every rank (rank 0 logs where the workers landed)."""
        node = ray.get_runtime_context().get_node_id()
        if not torch.distributed.is_initialized():
            return [node]
        nodes: list[str | None] = [None] * self.world_size
        torch.distributed.all_gather_object(nodes, node)
        return nodes

    def _gather_peak_rss(self) -> list[float]:
        """Every rank's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
        ranks = [0.0] * self.world_size
        ranks[self.rank] = peak_mb
        return [round(mb, 1) for mb in _all_reduce_sum(ranks, self.device)]

    # ------------------------------------------------------------------ one step

    def train_step(self, records: list[dict], epoch: int, micro: int, sync: bool) -> None:
        """Forward and backward of one micro-batch; DDP all-reduces gradients only when `sync`
        (the last micro-batch before an optimizer step)."""
        cfg, group_size = self.cfg, self.cfg.train_group_size
        rng = np.random.default_rng([cfg.seed, epoch, self.rank, micro])
        groups = [sample_group(r, group_size, rng) for r in records]
        encodings = tokenize_for(
            self.tokenizer,
            self.template,
            [g.query for g in groups for _ in g.passages],
            [p for g in groups for p in g.passages],
            self.spec.max_len,
            self.spec.query_max_len,
            self.spec.passage_max_len,
        )
        # Under FSDP every forward is collective: one chunk per micro-batch on every rank.
        budget = None if cfg.fsdp else cfg.forward_token_budget
        chunks, order, pad_tokens = make_chunks(
            encodings,
            budget,
            self.eval_engine.pad_id,
            self.device,
            left=self.template is not None,
        )
        if cfg.fsdp:
            self.encoder.hf_model.set_requires_gradient_sync(sync)
        no_sync = self.model is not self.encoder and not sync
        with self.model.no_sync() if no_sync else nullcontext():
            enabled = self.autocast_dtype is not None
            with torch.autocast(self.device.type, self.autocast_dtype, enabled=enabled):
                logits = self.model(chunks, order)
            loss = group_softmax_loss(logits, group_size)
            distill = self._distillation_loss(logits, groups)
            if distill is not None:
                loss = loss + cfg.distill_weight * distill
            self.scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        tokens = sum(len(e["input_ids"]) for e in encodings)
        distill_value = None if distill is None else distill.item()
        self.window.add(loss.item(), len(groups), tokens, tokens + pad_tokens, distill_value)
        self.pairs_trained += len(encodings)

    def _distillation_loss(self, logits: torch.Tensor, groups: list) -> torch.Tensor | None:
        """The KL term against the groups that carry teacher scores (None when none do, or
        `distill_weight` is 0)."""
        teacher_rows = [i for i, g in enumerate(groups) if g.teacher_scores is not None]
        if not teacher_rows or self.cfg.distill_weight <= 0:
            return None
        group_size = self.cfg.train_group_size
        teacher = torch.tensor([groups[i].teacher_scores for i in teacher_rows], device=self.device)
        student = logits.view(-1, group_size)[teacher_rows]
        return distillation_loss(student, teacher, group_size, self.cfg.distill_temperature)

    def optimizer_step(self) -> None:
        if self.cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # ------------------------------------------------------------------ eval, logs, checkpoints

    def log(self, message: str) -> None:
        self.events.send("message", text=message)

    def track(self, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, self.step)

    def evaluate(self, label: str) -> dict[str, float]:
        """Each worker ranks its share of the eval groups; the metric sums are all-reduced.
        Under FSDP, whose forwards are collective, every worker ranks every group."""
        device, fsdp = self.device, self.cfg.fsdp
        mine = self.eval_groups if fsdp else self.eval_groups[self.rank :: self.world_size]
        self.encoder.eval()

        def score(pairs: list[list[str]]) -> list[float]:
            return self.eval_engine.score_pairs(pairs).tolist()

        sums = metric_sums(mine, score, self.cfg.metrics)
        names = list(sums)  # the same measures, in the same order, on every worker
        if not fsdp:
            sums = dict(zip(names, _all_reduce_sum([sums[n] for n in names], device), strict=True))
        self.encoder.train()
        metrics = mean_metrics(sums)
        self.history["eval"].append({"step": self.step, **metrics})
        self.last_evaluated = self.step
        self.events.send("eval", label=label, step=self.step, metrics=metrics)
        self.track({f"eval/{k}": v for k, v in metrics.items()})
        return metrics

    def log_progress(self) -> dict[str, float]:
        """Loss, lr and throughput over all workers since the last call: into the history
        (train_summary.json), the trackers, the console and the next report."""
        window = self.window.all_reduce(self.device, self.world_size)
        self.window = ThroughputWindow()
        logged = {
            "loss": window.mean_loss,
            "lr": self.scheduler.get_last_lr()[0],
            **window.rates(self.cfg.train_group_size),
        }
        sequences = window.groups * self.cfg.train_group_size
        flops = window.real_tokens * self.model_flops.per_token(
            window.real_tokens / max(1, sequences)
        )
        logged["mfu"] = flops / max(window.seconds, 1e-9) / self.peak_flops
        self.flops_done += flops
        self.flops_seconds += window.seconds
        if window.distill_micro_batches:
            logged["distill_loss"] = window.distill_loss_sum / window.distill_micro_batches
        self.history["loss"].append({"step": self.step, **logged})
        self.track({f"train/{k}": v for k, v in logged.items()})
        steps_done = self.step - self.resumed_from_step
        eta = (self.plan.total_steps - self.step) * self.train_seconds / max(1, steps_done)
        self.events.send(
            "progress",
            step=self.step,
            total_steps=self.plan.total_steps,
            epoch=self.step / self.plan.steps_per_epoch,
            eta_s=eta,
            resumed_from=self.resumed_from_step,
            **logged,
        )
        return {
            "loss": logged["loss"],
            "lr": logged["lr"],
            "pairs_per_s": logged["pairs_per_s"],
            "eta_s": eta,
        }

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything besides the model that a resumed run needs to continue bit for bit
        (collective under FSDP: every rank calls it)."""
        fsdp = self.cfg.fsdp
        return {
            "optimizer": (
                full_optimizer_state(self.model, self.optimizer)
                if fsdp
                else self.optimizer.state_dict()
            ),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "history": self.history,
            "rng": self._gather_rng_states(),
        }

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG state (dropout differs per rank), so each resumes its own stream."""
        if not torch.distributed.is_initialized():
            return [_rng_state()]
        states: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(states, _rng_state())
        return states

    def report(self, metrics: dict[str, Any], save: bool) -> None:
        """One `ray.train.report` with the latest eval metrics, and a checkpoint when `save`."""
        metrics = {"step": self.step, "epoch": self.step / self.plan.steps_per_epoch, **metrics}
        metrics[WORKER_GROUP_KEY] = self.group_hex
        if self.history["eval"]:
            metrics.update({k: v for k, v in self.history["eval"][-1].items() if k != "step"})
        if not save:
            ray.train.report(metrics)
            return
        # Under FSDP gathering the full model and optimizer state is collective.
        model_state = full_model_state(self.model) if self.cfg.fsdp else None
        state = self.checkpoint_state()  # collective: every rank's RNG state
        with tempfile.TemporaryDirectory() as folder:
            if self.rank == 0:
                _save_checkpoint(
                    folder, self.encoder, self.tokenizer, self.cfg, self.spec, state, model_state
                )
            checkpoint = Checkpoint.from_directory(folder) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)
        self.last_saved = self.step

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        if self._bad_data():
            return self.summary()
        if self.eval_groups and self.step == 0 and cfg.eval_on_start:
            self.history["eval_before"] = self.evaluate("before training")
            self._mark("first_eval")
        self._log_start()
        self.model.train()
        while self.step < plan.total_steps and not self._train_epoch():
            pass
        if self.data_error:
            return self.summary()
        if self.eval_groups and self.last_evaluated != self.step:
            self.evaluate("final")
        if self.last_saved != self.step:
            self.report({}, save=True)
        summary = self.summary()
        for tracker in self.trackers:
            tracker.finish({"output_dir": cfg.output_dir, "steps": self.step})
        return summary

    def _train_epoch(self) -> bool:
        """Train from `self.step` to the end of its epoch (or of the run); True when validation
        found bad rows and training stopped."""
        cfg, plan = self.cfg, self.plan
        accumulation = cfg.gradient_accumulation_steps
        epoch = self.step // plan.steps_per_epoch
        epoch_started_at_step = self.step
        skip = (self.step - epoch * plan.steps_per_epoch) * accumulation
        started = time.perf_counter()
        for micro, records in self._epoch_batches(epoch, skip):
            last = (micro + 1) % accumulation == 0 or micro == plan.micro_batches_per_epoch - 1
            self.train_step(records, epoch, micro, sync=last)
            if not last:
                continue
            self.optimizer_step()
            self._record_step_time(time.perf_counter() - started)
            if self._bad_data():
                return True
            self._between_steps()
            if self.step >= plan.total_steps:
                break
            started = time.perf_counter()
        if self.step == epoch_started_at_step:
            raise RuntimeError(f"worker {self.rank}: epoch {epoch} yielded no training batches")
        return False

    def _bad_data(self) -> bool:
        """Whether validation, running beside training, has found bad rows (then every rank
        stops at this step and the driver raises the error)."""
        self.data_error = self.validation.check()
        if self.data_error:
            self.log(f"stopped at step {self.step}: validation found invalid training rows")
        return self.data_error is not None

    def _record_step_time(self, seconds: float) -> None:
        self.window.seconds += seconds
        self.train_seconds += seconds
        if self.first_step_at is None:
            self.first_step_at = time.time()
            self._mark("first_step")
            self.log(f"first step done {self.first_step_at - self.launched_at:.1f}s after launch")
            self.log(f"start-up: {format_startup(self.startup)}")

    def _between_steps(self) -> None:
        """Evaluate, log and report as the schedule says. Evaluation comes first so that every
        report carries the freshest metrics, and there is one report per step at most: a
        scheduler such as ASHA may stop the trial on any report, so a checkpoint due at this
        step travels with that step's metrics.

        Only an evaluation or a checkpoint is reported to Ray: a report waits until Ray Train's
        controller has taken the previous one (it polls every 2 s by default), so reporting each
        logged step would hold fast steps to one per poll. Logged steps reach the console and
        trackers through rank 0's events instead."""
        cfg, step, final = self.cfg, self.step, self.step == self.plan.total_steps
        evaluate = self.eval_groups and (final or (cfg.eval_steps and step % cfg.eval_steps == 0))
        if evaluate:
            self.evaluate("final" if final else "")
        save_every = cfg.save_steps or cfg.eval_steps
        save = final or bool(save_every and step % save_every == 0)
        metrics = self.log_progress() if final or step % cfg.logging_steps == 0 else {}
        if evaluate or save:
            self.report(metrics, save=save)

    def _log_start(self) -> None:
        plan = self.plan
        if self.step:
            self.log(f"resumed from checkpoint at step {self.step}/{plan.total_steps}")
        if len(set(self.worker_nodes)) > 1:
            self.log(f"workers on {len(set(self.worker_nodes))} nodes: {self.worker_nodes}")
        backend = (
            f", {torch.distributed.get_backend()} backend"
            if torch.distributed.is_initialized()
            else ""
        )
        shuffled = (
            "shuffled whole"
            if plan.shuffle_rows >= plan.groups_per_worker
            else f"shuffled {plan.shuffle_rows} at a time"
        )
        self.log(
            f"training {plan.total_steps} steps ({plan.steps_per_epoch}/epoch, {plan.epochs} "
            f"epoch(s)), {self.world_size} worker(s) on {self.device.type}, "
            f"{plan.groups_per_worker} groups per worker per epoch ({shuffled}){backend}"
        )

    def summary(self) -> dict[str, Any]:
        """What the worker returns to the driver (rank 0's goes into train_summary.json)."""
        return {
            "steps": self.step,
            "data_error": self.data_error,
            "resumed_from_step": self.resumed_from_step,
            "loss": self.history["loss"],
            "eval_before": self.history.get("eval_before"),
            "eval": self.history["eval"],
            "pairs_trained": self.pairs_trained * self.world_size,
            "train_seconds": self.train_seconds,
            "time_to_first_step_s": (
                self.first_step_at - self.launched_at if self.first_step_at else None
            ),
            "mfu": self.flops_done / max(self.flops_seconds, 1e-9) / self.peak_flops,
            "peak_flops": {"flops_per_s": self.peak_flops, "source": self.peak_source},
            "startup_s": self.startup,  # seconds after launch at the end of each stage
            "worker_nodes": self.worker_nodes,  # Ray node id of each rank
            "peak_rss_mb": self._gather_peak_rss(),  # of each rank's process
            "peak_gpu_memory_gb": (
                torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.device.type == "cuda"
                else None
            ),
        }


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: set up the recipe, then train."""
    recipe = FinetuneRecipe(loop_config)
    recipe.setup(loop_config["model_path"], loop_config.get("eval_groups"))
    return recipe.train()

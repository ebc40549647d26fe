"""Typed configs shared by the CLI, the `jobs/` entry points and YAML files.

Every field is one CLI flag (`--field_name`) and one YAML key, with the same name. Precedence is
default < YAML file (`--config`) < command-line flag.

Options are declared once, in pydantic dataclasses: a field's type, bounds (`Positive`,
`Fraction`, ...) and choices (`Literal`) are checked when a config is built, wherever it is
built (CLI, YAML, jobs, a Tune trial, a Ray Train worker), and cross-field rules are
`model_validator`s that only raise. A bad value is one `ConfigError` line naming the key.
Checks that read the file system (`check_paths`) run once, in `load_config`, on the driver.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from raykit.core.precision import check_cpu_precision
from raykit.errors import ConfigError


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _list_opt(help: str) -> Any:
    return field(default_factory=list, metadata={"help": help})


def _as_list(value: Any) -> Any:
    """A YAML scalar is a one-item list; a mapping (`search: {lr: ...}`) is KEY=VALUE items."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in values]


Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)
StrList = Annotated[list[str], BeforeValidator(_as_list)]


_PYDANTIC = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
C = TypeVar("C")


def _one_line(exc: ValidationError) -> str:
    """The first error of a ValidationError as `key: what was expected, got VALUE`."""
    error = exc.errors()[0]
    ctx, key = error.get("ctx") or {}, ".".join(str(p) for p in error["loc"])
    if error["type"] == "value_error":  # a ConfigError raised by a validator says it all
        return str(ctx.get("error", error["msg"]))
    value = error.get("input")
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}  # fmt: skip
    if error["type"] in bounds:
        if "lt" in ctx and isinstance(value, (int, float)) and value >= 0:
            return f"{key}: must be in [0, {ctx['lt']:g}), got {value}"
        return f"{key}: must be {bounds[error['type']].format(**ctx)}, got {value}"
    if error["type"] == "literal_error":
        choices = ctx["expected"].replace("'", "")
        return f"{key}: expected {choices}, got {value!r}"
    if error["type"] == "unexpected_keyword_argument":
        return f"unknown option {key!r}"
    kind = error["type"].split("_")[0].replace("parsing", "")
    names = {"int": "int", "float": "float", "bool": "true/false", "string": "str", "list": "list"}
    return f"{key}: expected {names.get(kind, kind)}, got {value!r}"


def options(cls: type[C]) -> type[C]:
    """A pydantic dataclass whose construction raises a one-line `ConfigError`."""
    model = pydantic_dataclass(cls, config=_PYDANTIC)
    init = model.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from None

    model.__init__ = __init__  # type: ignore[method-assign]
    return model


class _OptionGroup:
    """Base of the option groups below. A command's config inherits the groups it has, so a
    shared option and its rules are declared in one place. `panel` is its --help section."""

    panel = "Options"

    def check_paths(self) -> None:
        """File-system checks of the driver's inputs (`load_config` runs them once)."""

    def check_files(self) -> None:
        """The input files the command reads are there: light (no torch), so that the CLI
        runs it before it starts Ray and a typo costs no Ray start."""

    def ray_cpus(self) -> float | None:
        """The logical CPUs a local Ray instance needs for this command (see `init_ray`); None
        for a command that may run without Ray."""
        return None


@options
class Console(_OptionGroup):
    panel = "Output"

    verbose: bool = _opt(
        False, "Show everything Ray and transformers print (worker logs, Ray Data plans)."
    )


@options
class Tracking(_OptionGroup):
    panel = "Tracking"

    report_to: StrList = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "none, or any of tensorboard mlflow wandb (or all): config, every "
            "logged metric with its step, eval metrics, the model path."
        },
    )
    logging_dir: str | None = _opt(
        None, "TensorBoard/W&B files (default: <storage_path>/<run_name>/tensorboard)."
    )

    @field_validator("report_to")
    @classmethod
    def _known_backends(cls, value: list[str]) -> list[str]:
        import importlib.util

        names = parse_report_to(value) or ["none"]
        for backend in names:
            if backend != "none" and importlib.util.find_spec(PACKAGES[backend]) is None:
                raise ConfigError(
                    f"report_to: {backend} needs `pip install {PACKAGES[backend]}` "
                    "(or `pip install raykit[tracking]`)"
                )
        return names

    @property
    def backends(self) -> list[str]:
        return [name for name in self.report_to if name != "none"]


@options
class Adapters(_OptionGroup):
    """LoRA (peft) and FSDP: how a large (decoder) reranker fits the GPUs it trains on."""

    panel = "LoRA and sharding"

    use_lora: bool = _opt(False, "Train LoRA adapters (peft) instead of every weight.")
    lora_rank: Positive = _opt(64, "LoRA rank r.")
    lora_alpha: PositiveFloat = _opt(
        16.0, "LoRA scaling alpha (the update is scaled by alpha / r)."
    )
    lora_dropout: Fraction = _opt(0.1, "Dropout on the LoRA branch.")
    lora_target_modules: StrList = _list_opt(
        "Module names to adapt, e.g. q_proj k_proj v_proj o_proj (default: all-linear, every "
        "linear layer but the output head)."
    )
    save_merged_model: bool = _opt(
        True,
        "With --use_lora, export the base with the adapter merged in (a plain HF model); "
        "--no-save_merged_model exports the adapter, which names its base.",
    )
    fsdp: bool = _opt(
        False,
        "Shard parameters, gradients and optimizer state over the workers (torch FSDP2) "
        "instead of replicating the model (DDP): for models that do not fit one device.",
    )

    @model_validator(mode="after")
    def _lora_options_need_lora(self) -> Any:
        if self.lora_target_modules and not self.use_lora:
            raise ConfigError("lora_target_modules: only used with --use_lora")
        if self.use_lora:
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ConfigError("use_lora: needs peft (pip install peft)")
        return self


@options
class ModelLoading(_OptionGroup):
    panel = "Model loading"

    trust_remote_code: bool = _opt(False, "Allow custom model code from the hub.")
    model_kind: Literal["auto", "encoder", "decoder"] = _opt(
        "auto",
        "auto|encoder|decoder. auto: a *ForCausalLM checkpoint is a decoder reranker (scored "
        "logit(yes) - logit(no) at the last prompt token), anything else a one-logit encoder.",
    )
    template: str | None = _opt(
        None, "Decoder prompt: qwen3, gemma or a JSON/YAML file (default: by model type)."
    )
    instruction: str | None = _opt(None, "Decoder prompt instruction (qwen3's <Instruct>).")
    yes_token: str | None = _opt(None, "Decoder: the token whose logit says relevant.")
    no_token: str | None = _opt(None, "Decoder: the token whose logit says not relevant.")
    allow_untrained_head: bool = _opt(
        False,
        "Score with a model that has no trained reranker head (a base or embedding model: "
        "transformers creates a random one, so scores mean nothing). finetune creates the head.",
    )


@options
class Precision(_OptionGroup):
    panel = "Precision"

    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = _opt(
        "auto",
        "auto|float32|bfloat16|float16|int8. auto: fp32 on CPU (scores equal a plain fp32 "
        "forward), bf16 (or fp16) on GPU. int8 (inference only) needs torchao.",
    )
    fp16: bool = _opt(False, "Alias of --dtype float16 (training: autocast + GradScaler).")
    bf16: bool = _opt(False, "Alias of --dtype bfloat16.")
    allow_slow_precision: bool = _opt(
        False,
        "Run bf16/fp16 on a CPU that only emulates it (no avx512_bf16/AMX for bf16: ~40x slower "
        "than fp32), which is otherwise refused.",
    )

    @model_validator(mode="after")
    def _one_precision(self) -> Any:
        if self.fp16 and self.bf16:
            raise ConfigError("fp16/bf16: choose one")
        flag = "--fp16" if self.fp16 else "--bf16" if self.bf16 else None
        if flag and self.dtype not in ("auto", self.precision):
            raise ConfigError(f"dtype: {self.dtype} conflicts with {flag}")
        return self

    @property
    def precision(self) -> str:
        """The requested precision, aliases applied (`auto` is resolved per device later)."""
        return "float16" if self.fp16 else "bfloat16" if self.bf16 else self.dtype

    def check_hardware(self, use_gpu: bool) -> None:
        """Refuse, before Ray starts, a precision this machine's CPU only emulates. Only for a
        local CPU run: on a cluster the workers' CPUs may differ, and each worker checks its own."""
        if not use_gpu and not os.environ.get("RAY_ADDRESS"):
            check_cpu_precision(self.precision, self.allow_slow_precision)


@options
class ForwardBudget(_OptionGroup):
    panel = "Batching"

    forward_token_budget: Positive = _opt(
        4096,
        "Most padded tokens per forward pass: pairs are sorted by length and cut into chunks "
        "so that padding stays small (CPU: 2048-4096; GPU: 32768 or more).",
    )


@options
class Metrics(_OptionGroup):
    panel = "Evaluation"

    metric_for_best_model: str = _opt(
        "nDCG@10", "The measure that picks the best checkpoint (and drives tune); added to metrics."
    )
    metrics: StrList = field(
        default_factory=lambda: ["nDCG@10", "RR@10", "AP"],
        metadata={"help": "ir-measures names, any cutoff: nDCG@10 RR@10 AP R@100 P@5 ..."},
    )

    @field_validator("metric_for_best_model")
    @classmethod
    def _canonical_best(cls, value: str) -> str:
        from raykit.core.metrics import canonical_metric

        return canonical_metric(value)

    @field_validator("metrics")
    @classmethod
    def _canonical_metrics(cls, value: list[str], info: Any) -> list[str]:
        """ir-measures' names, with the best-model measure added."""
        from raykit.core.metrics import parse_metrics

        best = info.data.get("metric_for_best_model")
        return parse_metrics([*value, *([best] if best else [])])


@options
class TokenLimits(_OptionGroup):
    panel = "Token limits"

    # None: the model's own (its raykit_reranker.json), else the default; an explicit value
    # overrides the model's and says so.
    max_len: Positive | None = _opt(
        None, "Maximum tokens of a (query, passage) pair (default: the model's, else 512)."
    )
    query_max_len: Positive | None = _opt(
        None, "Maximum query tokens (default: the model's, else max_len // 2)."
    )
    passage_max_len: Positive | None = _opt(
        None, "Maximum passage tokens (default: the model's, else max_len)."
    )


@options
class CompileCache(_OptionGroup):
    panel = "Compiling"

    compile_cache: str | None = _opt(
        None,
        "Folder on each node where compiled encoders are kept, so that a checkpoint compiles "
        "once and the next replica or scoring actor restores it in about a second (default "
        "$RAYKIT_CACHE/compiled or ~/.cache/raykit/compiled; off: compile on every start).",
    )

    def compile_cache_dir(self) -> str | None:
        """Where compiled packages are kept (None: not kept)."""
        from raykit.core.compiled import default_cache_dir

        if self.compile_cache == "off":
            return None
        return os.path.expanduser(self.compile_cache or default_cache_dir())

    def compiles(self, device_type: str) -> bool:
        """Whether the model is compiled on `device_type` (the command's `compile` option):
        `on`, or `auto` on CPU, where it was measured, and not int8, whose torchao kernels were
        not."""
        if self.compile == "auto":
            return device_type == "cpu" and self.precision != "int8"
        return self.compile == "on"


@options
class FinetuneConfig(
    Adapters, Tracking, Metrics, ForwardBudget, TokenLimits, Precision, ModelLoading, Console
):
    """Everything `raykit finetune` and `jobs/finetune.py` accept (FlagEmbedding flag names)."""

    # Model and data
    model_name_or_path: str = _opt(
        "BAAI/bge-reranker-base",
        "HF hub id, local path, or an embedded model name (minilm-l6).",
    )
    train_data: StrList = _list_opt("JSONL files, directories of *.jsonl(.gz), or URIs.")
    eval_data: StrList = _list_opt("Same format as train_data; ranks each group's pos+neg.")
    output_dir: str = _opt("output", "Where the best model is written in Hugging Face format.")
    overwrite_output_dir: bool = _opt(
        False, "Replace a non-empty output_dir (as a whole) instead of refusing to start."
    )
    skip_invalid: bool = _opt(False, "Skip invalid rows (counted per reason) instead of failing.")
    # Optimisation
    learning_rate: PositiveFloat = _opt(5e-5, "Peak learning rate of AdamW.")
    weight_decay: NonNegative = _opt(
        0.0, "AdamW weight decay (not applied to biases and LayerNorm)."
    )
    warmup_ratio: Fraction = _opt(0.0, "Fraction of steps with linear warm-up.")
    max_grad_norm: NonNegative = _opt(1.0, "Gradient-norm clipping; 0 turns it off.")
    num_train_epochs: int = _opt(1, "Epochs over the training groups.")
    max_steps: int = _opt(-1, "Optimizer steps in total; overrides num_train_epochs when > 0.")
    per_device_train_batch_size: Positive = _opt(4, "Groups per worker per micro-batch.")
    gradient_accumulation_steps: Positive = _opt(1, "Micro-batches per optimizer step.")
    dataloader_drop_last: bool = _opt(False, "Drop each worker's last incomplete micro-batch.")
    train_group_size: Annotated[int, Field(ge=2)] = _opt(
        8, "1 positive + (train_group_size-1) negatives per group."
    )
    seed: int = _opt(42, "Seed for model init, group sampling and shuffling.")
    # Loss
    distill_temperature: PositiveFloat = _opt(1.0, "Temperature of the teacher-score KL term.")
    distill_weight: NonNegative = _opt(
        1.0, "Weight of the KL term when the data has teacher scores."
    )
    gradient_checkpointing: bool = _opt(False, "Recompute activations to save memory.")
    torch_compile: bool = _opt(
        False,
        "Compile each chunk's forward and backward with inductor (dynamic shapes), after a "
        "compile at the start; on CPU it measured no faster (bench/train_compile.py).",
    )
    # Ray
    num_workers: Positive = _opt(1, "Ray Train workers (one per GPU with --use_gpu).")
    use_gpu: bool = _opt(False, "One GPU per worker, NCCL backend.")
    cpus_per_worker: PositiveFloat = _opt(1.0, "CPUs reserved per worker (also its torch threads).")
    worker_resources: StrList = _list_opt(
        "Extra resources per worker, KEY=AMOUNT (a custom node resource such as trainer_node=1)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _opt(
        "PACK", "Worker placement: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one per node)."
    )
    run_name: str | None = _opt(None, "Ray Train run name; reuse it to resume a run.")
    storage_path: str | None = _opt(None, "Checkpoint storage (local dir or s3://...).")
    max_failures: Annotated[int, Field(ge=-1)] = _opt(
        0, "Worker failures to recover from, from the last checkpoint."
    )
    # Logging, evaluation, checkpoints
    logging_steps: Positive = _opt(10, "Log loss, lr and throughput every N optimizer steps.")
    eval_steps: Positive | None = _opt(
        None, "Evaluate every N steps (always before and at the end)."
    )
    save_steps: Positive | None = _opt(
        None, "Checkpoint every N steps (default: eval_steps; always at the end)."
    )
    save_total_limit: Positive = _opt(
        2, "Checkpoints kept (the best by metric_for_best_model, and the latest)."
    )
    eval_batch_size: Positive = _opt(64, "Pairs per forward pass during evaluation.")
    eval_on_start: bool = _opt(True, "Evaluate the untrained model before the first step.")

    @field_validator("worker_resources")
    @classmethod
    def _resource_amounts(cls, value: list[str]) -> list[str]:
        for item in value:
            key, sep, amount = item.partition("=")
            try:
                ok = bool(sep and key.strip()) and float(amount) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"worker_resources: expected KEY=AMOUNT > 0, got {item!r}")
        return value

    @model_validator(mode="after")
    def _trainable(self) -> Any:
        """Fail early with the offending key, before any cluster work starts."""
        if not self.train_data:
            raise ConfigError("train_data: at least one file, directory or URI is required")
        if self.precision == "int8":
            raise ConfigError("dtype: int8 is for inference only (score, serve, evaluate, mine)")
        if self.torch_compile and self.fsdp:
            raise ConfigError("torch_compile: not with fsdp (compile the unsharded DDP model)")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("num_train_epochs: must be > 0 unless max_steps is set")
        return self

    def check_paths(self) -> None:
        """A model given as a folder exists and the output folder can be written (whether it is
        empty is the run's check)."""
        from raykit.runtime.storage import check_model_folder, check_writable

        check_model_folder(self.model_name_or_path, "model_name_or_path")
        check_writable(self.output_dir, "output_dir")

    def check_files(self) -> None:
        from raykit.data.groups import expand_paths

        for paths in (self.train_data, self.eval_data):
            if paths:
                expand_paths(paths)

    def ray_cpus(self) -> float | None:
        return self.num_workers * self.cpus_per_worker

    @property
    def extra_worker_resources(self) -> dict[str, float]:
        """`worker_resources` as a dict: ["trainer_node=1"] -> {"trainer_node": 1.0}."""
        pairs = (item.partition("=") for item in self.worker_resources)
        return {key.strip(): float(amount) for key, _, amount in pairs}


@options
class EvaluateConfig(Metrics, ForwardBudget, TokenLimits, Precision, ModelLoading, Console):
    """`raykit evaluate`: a model on groups (each group's pos + neg reranked), or a TREC run
    against qrels."""

    model_name_or_path: str = _opt("BAAI/bge-reranker-base", "Model to evaluate.")
    eval_data: StrList = _list_opt("JSONL groups (query, pos, neg).")
    eval_batch_size: Positive = _opt(64, "Pairs per forward pass.")
    run: str | None = _opt(None, "A TREC run (qid Q0 docid rank score tag) to evaluate.")
    qrels: str | None = _opt(None, "Judgements for --run: TREC (qid 0 docid rel) or BEIR TSV.")
    output: str | None = _opt(None, "Also write {measure: value} to this JSON file.")

    @model_validator(mode="after")
    def _one_input(self) -> Any:
        if bool(self.run) != bool(self.qrels):
            raise ConfigError("run/qrels: give both, or neither (then eval_data and a model)")
        if self.run and self.eval_data:
            raise ConfigError("eval_data: not with --run (a run is evaluated as it is)")
        if not self.run and not self.eval_data:
            raise ConfigError("eval_data: at least one file is required (or --run and --qrels)")
        return self

    def check_paths(self) -> None:
        _check_files({"run": self.run, "qrels": self.qrels})


@options
class ScoreConfig(CompileCache, ForwardBudget, TokenLimits, Precision, ModelLoading, Console):
    """`raykit score`: rescore (query, passage) pairs or query groups with Ray Data."""

    model: StrList = field(
        default_factory=lambda: ["BAAI/bge-reranker-base"],
        metadata={
            "help": "Model dir, HF hub id or embedded name. Repeat it for a teacher ensemble: "
            "each score is the mean of the models' raw scores (they must share a tokenizer "
            "and prompt format, e.g. fine-tunes of one base)."
        },
    )
    input: StrList = _list_opt(
        "JSONL, JSONL.gz or Parquet files, directories or URIs. Rows are pairs "
        "{query, passage, ...} or groups {query, candidates: [str], ...}."
    )
    output: str = _opt("scored", "Output directory: one file per input file.")
    format: Literal["parquet", "jsonl", "trec"] = _opt(
        "parquet", "Output format: parquet, jsonl, or trec (with --run: a reranked TREC run)."
    )
    run: str | None = _opt(
        None, "Rerank a first-stage TREC run (qid Q0 docid rank score tag) instead of --input."
    )
    queries: str | None = _opt(None, "With --run: BEIR queries JSONL {_id, text} or id<TAB>text.")
    corpus: StrList = _list_opt(
        "With --run: BEIR corpus JSONL {_id, title?, text} or id<TAB>text (only the run's "
        "documents are kept in memory)."
    )
    run_tag: str = _opt("raykit", "With --run: the tag column of the reranked TREC run.")
    query_field: str = _opt("query", "Column holding the query.")
    passage_field: str = _opt("passage", "Column holding the passage of a pair row.")
    candidates_field: str = _opt("candidates", "Column holding a group row's passages.")
    group_by: str | None = _opt(
        None, "Rank pair rows within this column (e.g. query_id), per input file."
    )
    top_k: Positive | None = _opt(
        None, "Keep the best N rows per query (needs groups or group_by)."
    )
    normalize: bool = _opt(False, "Add normalized_score = sigmoid(score).")
    num_actors: Positive | None = _opt(
        None,
        "Scoring actors, a fixed pool (default: one per GPU with --use_gpu; on CPU "
        "actors x cpus_per_actor = the cluster's cores, less one for reading and tokenising).",
    )
    min_actors: Positive | None = _opt(None, "Autoscaling pool: at least this many actors.")
    max_actors: Positive | None = _opt(None, "Autoscaling pool: at most this many actors.")
    use_gpu: bool = _opt(False, "One GPU per scoring actor.")
    cpus_per_actor: PositiveFloat | None = _opt(
        None,
        "CPUs per scoring actor, its torch threads on CPU (default: 1 on machines of up "
        "to 4 cores, else 4; 1 with --use_gpu).",
    )
    batch_size: Positive = _opt(64, "Most pairs per forward pass.")
    compile: Literal["auto", "on", "off"] = _opt(
        "auto",
        "auto|on|off: score with the encoder compiled ahead of time (+20-30% pairs/s measured "
        "on CPU). auto: with a package already kept for this checkpoint (by `--compile on` or "
        "`raykit serve`), restored in about a second, else eager; on: compile one first if "
        "none is kept (tens of seconds, once per node and checkpoint); off: eager.",
    )
    sort_window: Positive | None = _opt(
        None,
        "Pairs sorted by length together; also the unit of work of an actor, so the first "
        "scores wait for one (default: 256 on CPU, 1024 with --use_gpu).",
    )
    tokenize_tasks: Positive | None = _opt(
        None,
        "Most read/tokenise tasks at once (default: max actors, at least 2); each runs in "
        "a worker process that holds the tokenizer.",
    )
    object_store_limit_mib: Positive = _opt(
        512,
        "Most MiB of blocks in flight in Ray's object store; keeps memory bounded whatever "
        "the input size (raise it for many GPU actors or big windows).",
    )
    resume: bool = _opt(False, "Skip input files whose output is complete.")
    overwrite: bool = _opt(False, "Replace existing outputs instead of failing.")
    errors_path: str | None = _opt(
        None, "JSONL of rejected rows with file, line and reason (default: OUTPUT/_errors.jsonl)."
    )
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = _opt(
        0.0, "Exit non-zero when rejected rows / rows exceed this."
    )

    @model_validator(mode="after")
    def _one_input_and_pool(self) -> Any:
        if not self.model:
            raise ConfigError("model: at least one model is required")
        if self.run:
            if self.input:
                raise ConfigError("input: not with --run (the run, queries and corpus are it)")
            if not self.queries or not self.corpus:
                raise ConfigError("run: needs --queries and --corpus (BEIR layout or TSV)")
        elif not self.input:
            raise ConfigError("input: at least one file, directory or URI is required")
        if self.format == "trec" and not self.run:
            raise ConfigError("format: trec needs --run (a TREC run to rerank)")
        if len(self.run_tag.split()) != 1:
            raise ConfigError(f"run_tag: one word without spaces, got {self.run_tag!r}")
        low, high = self.actor_pool_size
        if low > high:
            raise ConfigError(f"min_actors ({low}) must be <= max_actors ({high})")
        if self.resume and self.overwrite:
            raise ConfigError("resume/overwrite: choose one")
        return self

    def check_paths(self) -> None:
        _check_model_folders(self.model)

    @property
    def device_type(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    def ray_cpus(self) -> float | None:
        """Every core for the actors unless their number is given, and one for reading."""
        explicit = self.actor_pool_size[1] * (self.cpus_per_actor or 1.0)
        wanted = explicit if self.num_actors or self.max_actors else (os.cpu_count() or 1)
        return wanted + 1

    @property
    def actor_pool_size(self) -> tuple[int, int]:
        """(min, max) actors: a fixed pool of num_actors unless min/max_actors are given."""
        fixed = self.num_actors or 1
        low = self.min_actors or (1 if self.max_actors else fixed)
        return low, self.max_actors or max(low, fixed)

    def sized_for(self, total_cpus: int, gpus: int, local: bool) -> ScoreConfig:
        """A copy with unset actor counts, CPU shares and window filled in: one actor per GPU with
        `use_gpu`; on CPU `split_cpus` of the cores, less one core on a cluster for the read and
        tokenise tasks (a local instance has spare logical CPUs for them, and tokenising is
        cheap next to a forward pass, so a core of its own would mostly idle)."""
        from raykit.runtime.cluster import split_cpus

        # On CPU a window of 256 pairs is a few seconds of one core, and pads about as little.
        cfg = dataclasses.replace(
            self, sort_window=self.sort_window or (1024 if self.use_gpu else 256)
        )
        if cfg.num_actors or cfg.min_actors or cfg.max_actors:
            return dataclasses.replace(cfg, cpus_per_actor=cfg.cpus_per_actor or 1.0)
        if cfg.use_gpu:
            return dataclasses.replace(
                cfg, num_actors=max(1, gpus), cpus_per_actor=cfg.cpus_per_actor or 1.0
            )
        cores = total_cpus if local else max(1, total_cpus - 1)
        actors, threads = split_cpus(cores)
        if cfg.cpus_per_actor:
            actors, threads = max(1, int(cores // cfg.cpus_per_actor)), cfg.cpus_per_actor
        return dataclasses.replace(cfg, num_actors=actors, cpus_per_actor=float(threads))


@options
class ServeConfig(CompileCache, ForwardBudget, TokenLimits, Precision, ModelLoading, Console):
    """`raykit serve` and `serve run examples/serve.yaml`: a reranking endpoint on Ray Serve."""

    model: StrList = field(
        default_factory=lambda: ["BAAI/bge-reranker-base"],
        metadata={
            "help": "Model dir, HF hub id or embedded name. NAME=PATH, repeatable: several "
            "models behind one endpoint, picked by the request's `model` field (the first is "
            "the default). In YAML a list or a NAME: PATH mapping."
        },
    )
    model_name: str | None = _opt(
        None, "Name reported by the API (default: the model's hub id, or its folder's name)."
    )
    rollout: bool = _opt(
        False,
        "Roll the running app (same app_name) over to --model in place: each replica loads "
        "the new checkpoint beside the old one and switches when it is ready, so no request "
        "fails; returns when every replica serves it.",
    )
    host: str = _opt("127.0.0.1", "Bind address of Serve's HTTP proxy (0.0.0.0 for all).")
    port: Positive = _opt(8000, "Port of Serve's HTTP proxy.")
    route_prefix: str = _opt("/", "URL prefix of the app.")
    app_name: str = _opt("raykit", "Serve application name.")
    min_replicas: NonNegativeInt | None = _opt(
        None, "Autoscaling: fewest replicas per model (default 1; 0 scales to zero when idle)."
    )
    max_replicas: Positive | None = _opt(
        None,
        "Autoscaling: most replicas (default: one per GPU with --use_gpu; on CPU "
        "replicas x cpus_per_replica = the node's cores).",
    )
    target_ongoing_requests: PositiveFloat = _opt(4.0, "Autoscaling: ongoing requests per replica.")
    upscale_delay_s: NonNegative = _opt(
        3.0, "Autoscaling: how long load must stay above target before a replica is added."
    )
    downscale_delay_s: NonNegative = _opt(
        30.0, "Autoscaling: how long load must stay below target before a replica is removed."
    )
    look_back_period_s: PositiveFloat = _opt(
        10.0,
        "Autoscaling: the window over which ongoing requests are averaged (Serve's default, "
        "30 s, sees a load step half a minute late).",
    )
    use_gpu: bool = _opt(False, "One GPU per replica.")
    cpus_per_replica: PositiveFloat | None = _opt(
        None,
        "CPUs per replica, its torch threads on CPU (default: 1 on nodes of up to 4 "
        "cores, else 4; 1 with --use_gpu).",
    )
    max_batch_size: Positive = _opt(
        64, "Most (query, document) pairs per batch, from any requests."
    )
    max_batch_tokens: Positive = _opt(16384, "Most tokens (unpadded) per batch of pairs.")
    batch_wait_timeout_s: float = _opt(
        0.01, "When the model was idle, how long the next batch waits for more pairs."
    )
    max_ongoing_requests: Positive | None = _opt(
        None, "Requests a replica works on at once (default: max_batch_size)."
    )
    max_queued_requests: Positive = _opt(
        256, "Requests waiting for a model replica; beyond that a JSON 429 + Retry-After."
    )
    compile: Literal["auto", "on", "off"] = _opt(
        "auto",
        "auto|on|off: compile each replica's model before it serves (+15% fp32 / +11% bf16 "
        "docs/s measured on CPU): the first replica of a checkpoint compiles it ahead of time "
        "(tens of seconds), the next ones restore the kept package in about a second (see "
        "--compile_cache). auto: on CPU, not int8.",
    )
    access_log: bool = _opt(True, "Log one line per request on each replica (off saves CPU).")
    retry_after_s: int = _opt(1, "Retry-After seconds on 429.")
    max_documents: Positive = _opt(1000, "Most documents per request (413 beyond).")
    max_request_bytes: Positive = _opt(4_000_000, "Largest request body (413 beyond).")
    api_key: str | None = _opt(
        None, "Require 'Authorization: Bearer KEY' on all but /health (env RAYKIT_API_KEY)."
    )
    detach: bool = _opt(
        False, "Deploy and return; the app keeps running on the cluster (jobs/serve.py)."
    )

    @model_validator(mode="after")
    def _replicas_and_batches(self) -> Any:
        from raykit.core.served import parse_models

        parse_models(self.model, self.model_name)  # names and NAME=PATH items are checked here
        if self.min_replicas and self.max_replicas and self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.max_len and self.max_len > self.max_batch_tokens:
            raise ConfigError("max_batch_tokens: must be >= max_len (one pair must fit)")
        if not self.route_prefix.startswith("/"):
            raise ConfigError("route_prefix: must start with '/'")
        return self

    def check_paths(self) -> None:
        from raykit.core.served import parse_models

        _check_model_folders([m.path for m in parse_models(self.model, self.model_name)])

    def ray_cpus(self) -> float | None:
        """The replicas' CPUs when given, else every core; None to roll out (that joins the
        cluster the app runs on)."""
        if self.rollout:
            return None
        explicit = self.max_replicas and self.cpus_per_replica
        return self.max_replicas * self.cpus_per_replica if explicit else (os.cpu_count() or 1)

    def sized_for(self, node_cpus: int, gpus: int) -> ServeConfig:
        """A copy with every unset replica count and CPU share filled in so that the replicas
        use the whole node: one per GPU with `use_gpu`, else `split_cpus(node_cpus)`."""
        from raykit.runtime.cluster import split_cpus

        if self.use_gpu:
            copies, threads = max(1, gpus), 1
        else:
            copies, threads = split_cpus(node_cpus)
            if self.cpus_per_replica:
                copies = max(1, int(node_cpus // self.cpus_per_replica))
        high = self.max_replicas or max(self.min_replicas or 1, copies)
        return dataclasses.replace(
            self,
            cpus_per_replica=self.cpus_per_replica or float(threads),
            max_replicas=high,
            min_replicas=min(1, high) if self.min_replicas is None else self.min_replicas,
        )


@options
class TuneConfig(FinetuneConfig):
    """`raykit tune`: every finetune key (the fixed part of each trial) plus the sweep keys."""

    search: StrList = _list_opt(
        "KEY=DIST:ARGS, repeatable: learning_rate=loguniform:1e-6:1e-4, "
        "train_group_size=choice:4,8,16 (also uniform:LO:HI, grid:A,B). In YAML a mapping."
    )
    num_samples: Positive = _opt(
        4, "Trials to sample (grid values are each run num_samples times)."
    )
    scheduler: Literal["asha", "fifo"] = _opt(
        "asha", "asha (stop weak trials early on the metric) or fifo."
    )
    max_concurrent_trials: Positive | None = _opt(
        None, "Default: what the cluster's CPUs/GPUs can run (trial workers + 1 CPU for data)."
    )
    grace_period: Positive | None = _opt(
        None, "ASHA: steps before a trial may be stopped (default: eval_steps)."
    )
    reduction_factor: Annotated[int, Field(ge=2)] = _opt(
        2, "ASHA: keep 1/reduction_factor of the trials at each rung."
    )

    def check_paths(self) -> None:
        """Nothing here: `run_sweep` checks the model, which may be swept, and the output
        folder, which keeps the sweep's state."""

    @model_validator(mode="after")
    def _sweepable(self) -> Any:
        if not self.eval_data:
            raise ConfigError("eval_data: a sweep needs eval data to compare trials")
        if not self.search:
            raise ConfigError("search: give at least one --search KEY=DIST:ARGS")
        parse_search(self.search)
        return self


@options
class RetrieveConfig(Console):
    """`raykit bm25`: a first-stage BM25 run over BEIR-layout queries and corpus."""

    queries: str = _opt("", "BEIR queries JSONL {_id, text} or id<TAB>text.")
    corpus: StrList = _list_opt("BEIR corpus JSONL {_id, title?, text} or id<TAB>text.")
    output: str = _opt("run.trec", "The TREC run to write (qid Q0 docid rank score tag).")
    top_k: Positive = _opt(100, "Documents per query.")
    run_tag: str = _opt("bm25", "The tag column of the run.")

    @model_validator(mode="after")
    def _inputs_given(self) -> Any:
        if not self.queries or not self.corpus:
            raise ConfigError("queries/corpus: both are required")
        return self

    def check_paths(self) -> None:
        for path in [self.queries, *self.corpus]:
            if "://" not in path and not Path(path).is_file():
                raise ConfigError(f"no such file: {path}")


@options
class MineConfig(ForwardBudget, TokenLimits, Precision, ModelLoading, Console):
    """`raykit mine`: add retrieved hard negatives to training groups."""

    input: StrList = _list_opt("JSONL groups {query, pos, neg?} (files, directories, URIs).")
    corpus: StrList = _list_opt(
        "JSONL {text, id?} to mine from (default: every pos/neg text of the input)."
    )
    queries: str | None = _opt(
        None, "Instead of --input, BEIR layout: queries JSONL {_id, text} (with --qrels, --corpus)."
    )
    qrels: str | None = _opt(
        None, "BEIR layout: qrels (TREC or BEIR TSV); documents with relevance > 0 are positives."
    )
    output: str = _opt("mined.jsonl", "Output JSONL in the training format.")
    retriever: Literal["bm25", "dense"] = _opt(
        "bm25", "bm25 (bm25s) or dense (an HF encoder, see --embedder)."
    )
    embedder: str = _opt("BAAI/bge-base-en-v1.5", "Dense retriever: HF encoder (mean pooling).")
    query_instruction: str = _opt("", "Dense retriever: text put before every query.")
    range: str = _opt(
        "10-100", "Sample negatives from retrieval ranks LO-HI (Python slice [LO:HI], 0-based)."
    )
    negatives: Positive = _opt(15, "Negatives sampled per query.")
    replace_neg: bool = _opt(False, "Replace the input's neg instead of adding to it.")
    pad_random: bool = _opt(False, "Top up short queries with random corpus texts.")
    filter_model: str | None = _opt(
        None, "Cross-encoder that drops likely false negatives (see --filter_margin)."
    )
    filter_margin: PositiveFloat = _opt(
        0.95, "Drop a candidate when sigmoid(score) > margin x sigmoid(best positive's score)."
    )
    batch_size: Positive = _opt(64, "Texts or pairs per forward pass.")
    num_actors: Positive = _opt(1, "Ray Data actors for embedding and filtering.")
    use_gpu: bool = _opt(False, "One GPU per actor.")
    cpus_per_actor: PositiveFloat = _opt(1.0, "CPUs per actor (its torch threads on CPU).")
    skip_invalid: bool = _opt(False, "Skip invalid input rows (counted) instead of failing.")
    seed: int = _opt(42, "Seed of the negative sampling.")

    @field_validator("range")
    @classmethod
    def _rank_range(cls, value: str) -> str:
        lo, sep, hi = value.partition("-")
        try:
            low, high = int(lo), int(hi)
        except ValueError:
            low = high = -1
        if not sep or low < 0 or high <= low:
            raise ConfigError(f"range: expected LO-HI with 0 <= LO < HI, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> Any:
        if self.queries or self.qrels:
            if self.input:
                raise ConfigError("input: not with --queries/--qrels (the BEIR layout is it)")
            if not (self.queries and self.qrels and self.corpus):
                raise ConfigError("qrels: the BEIR layout needs --queries, --qrels and --corpus")
        elif not self.input:
            raise ConfigError("input: at least one file, directory or URI is required")
        return self

    @property
    def sample_range(self) -> tuple[int, int]:
        """(lo, hi) from `range` = "LO-HI"."""
        lo, _, hi = self.range.partition("-")
        return int(lo), int(hi)


@options
class MixConfig(ForwardBudget, TokenLimits, ModelLoading, Console):
    """`raykit mix`: a weighted average of models of one architecture (LM-Cocktail)."""

    models: StrList = _list_opt("Two or more models (dirs, HF ids or embedded names).")
    weights: StrList = _list_opt(
        "One weight per model, >= 0, summing to 1; or 'auto' (needs --example_data)."
    )
    output: str = _opt("mixed", "Output directory (Hugging Face format).")
    overwrite_output_dir: bool = _opt(
        False, "Replace a non-empty output directory (as a whole) instead of refusing."
    )
    example_data: StrList = _list_opt("auto: a few JSONL groups {query, pos, neg}.")
    temperature: PositiveFloat = _opt(5.0, "auto: weights = softmax(-loss / temperature).")
    train_group_size: Annotated[int, Field(ge=2)] = _opt(
        8, "auto: 1 positive + up to N-1 negatives per group."
    )

    @model_validator(mode="after")
    def _weights(self) -> Any:
        if len(self.models) < 2:
            raise ConfigError("models: give at least two models to mix")
        if self.auto_weights:
            if not self.example_data:
                raise ConfigError("weights: 'auto' needs --example_data")
            return self
        weights = self.weight_values
        if len(weights) != len(self.models):
            raise ConfigError(f"weights: {len(weights)} weight(s) for {len(self.models)} models")
        if any(w < 0 for w in weights):
            raise ConfigError(f"weights: must be >= 0, got {weights}")
        if abs(sum(weights) - 1.0) > 1e-6:
            raise ConfigError(f"weights: must sum to 1 (+-1e-6), got {sum(weights)!r}")
        return self

    @property
    def auto_weights(self) -> bool:
        return [w.lower() for w in self.weights] == ["auto"]

    @property
    def weight_values(self) -> list[float]:
        try:
            return [float(w) for w in self.weights]
        except ValueError:
            raise ConfigError(f"weights: expected numbers or 'auto', got {self.weights}") from None


SEARCH_DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
UNSEARCHABLE = ("train_data", "eval_data", "output_dir", "run_name")


@dataclasses.dataclass(frozen=True)
class SearchDimension:
    """One swept key: (LO, HI) for loguniform/uniform, the typed values for choice/grid."""

    distribution: str
    values: tuple


def parse_search(specs: list[str]) -> dict[str, SearchDimension]:
    """Parse `KEY=DIST:ARGS` strings; ConfigError names the bad spec.

    loguniform:LO:HI and uniform:LO:HI sample floats (LO < HI); choice:A,B,C samples one value;
    grid:A,B,C runs every value. Values are converted to the key's type in FinetuneConfig.
    """
    keys = {f.name for f in dataclasses.fields(FinetuneConfig)} - set(UNSEARCHABLE)
    dimensions: dict[str, SearchDimension] = {}
    for spec in specs:
        key, sep, rest = spec.partition("=")
        dist, _, args = rest.partition(":")
        key, dist = key.strip(), dist.strip()
        where = f"--search {spec!r}"
        if not sep or not args:
            raise ConfigError(
                f"{where}: expected KEY=DIST:ARGS, e.g. learning_rate=loguniform:1e-6:1e-4"
            )
        if key not in keys:
            raise ConfigError(f"{where}: unknown or unsearchable key {key!r}")
        if dist not in SEARCH_DISTRIBUTIONS:
            raise ConfigError(
                f"{where}: unknown distribution {dist!r} (use {', '.join(SEARCH_DISTRIBUTIONS)})"
            )
        kind = field_type(FinetuneConfig, key)
        if dist in ("loguniform", "uniform"):
            try:
                low, high = (float(x) for x in args.split(":"))
            except ValueError:
                raise ConfigError(f"{where}: {dist} needs two numbers LO:HI") from None
            if not low < high:
                raise ConfigError(f"{where}: {dist} needs LO < HI, got {low} >= {high}")
            if dist == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform needs LO > 0")
            if kind is not float:
                raise ConfigError(f"{where}: {key} is {kind.__name__}; use choice or grid")
            dimensions[key] = SearchDimension(dist, (low, high))
            continue
        values = [v.strip() for v in args.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"{where}: {dist} needs at least one value")
        try:
            if kind is bool:
                typed = [v.lower() in ("true", "1", "yes") for v in values]
            else:
                typed = [kind(float(v)) if kind is int else kind(v) for v in values]
        except ValueError:
            raise ConfigError(f"{where}: values must be {kind.__name__}") from None
        dimensions[key] = SearchDimension(dist, tuple(typed))
    return dimensions


def field_type(cls: type, name: str) -> type:
    """The plain type of a config field: `Positive | None` -> int, `StrList` -> list, a
    `Literal` of strings -> str (the CLI and `--search` convert with it)."""
    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is Literal:
        return type(typing.get_args(hint)[0])
    return origin or hint


# Keys that were renamed: old YAML files and flags keep working, with a warning.
RENAMED_KEYS = {"chunk_tokens": "forward_token_budget", "metric": "metric_for_best_model"}


def _renamed(key: str, source: str) -> str:
    if key in RENAMED_KEYS:
        import sys

        new = RENAMED_KEYS[key]
        print(f"[raykit] warning: {source}: {key!r} is now {new!r}", file=sys.stderr, flush=True)
        return new
    return key


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Build a config from defaults, an optional YAML file and overrides (None = not given),
    then run its file-system checks. A bad value from the file names the file too."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    from_file: set[str] = set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        for key, value in data.items():
            key = _renamed(key, str(path))
            if key not in names:
                raise ConfigError(f"{path}: unknown key {key!r}")
            values[key] = value
            from_file.add(key)
    for key, value in overrides.items():
        key = _renamed(key, "option")
        if key not in names:
            raise ConfigError(f"unknown option {key!r}")
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        values[key] = list(value) if isinstance(value, tuple) else value
        from_file.discard(key)
    try:
        config = cls(**values)
    except ConfigError as exc:
        key = str(exc).partition(":")[0]
        raise (ConfigError(f"{path}: {exc}") if key in from_file else exc) from None
    config.check_paths()  # type: ignore[attr-defined]
    return config


def _check_model_folders(models: list[str]) -> None:
    """Each model given as a folder exists (see `check_model_folder`): before Ray starts."""
    from raykit.runtime.storage import check_model_folder

    for model in models:
        check_model_folder(model, "model")


def _check_files(paths: dict[str, str | None]) -> None:
    """ConfigError naming the first option whose local file does not exist."""
    for name, path in paths.items():
        if path and "://" not in path and not Path(path).is_file():
            raise ConfigError(f"{name}: no such file: {path}")


# --report_to backends and the package each needs.
BACKENDS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def parse_report_to(values: list[str]) -> list[str]:
    """`--report_to` values, checked: `none`, or any of BACKENDS (`all` means every one)."""
    names = [v.strip().lower() for value in values for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(BACKENDS)
    if not names or names == ["none"]:
        return []
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or "none" in names:
        raise ConfigError(
            f"report_to: expected none, all or any of {', '.join(BACKENDS)}, "
            f"got {', '.join(unknown or ['none'])}"
        )
    return list(dict.fromkeys(names))

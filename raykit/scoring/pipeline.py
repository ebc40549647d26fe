"""Offline batch rescoring of (query, passage) pairs with Ray Data on a pool of scoring actors.

Pipeline, streaming end to end:
  one read task per input file (JSONL, JSONL.gz or Parquet; every row keeps its file and line)
  -> validate and tokenise in CPU `map_batches` tasks
  -> sort by length within a window and score in `map_batches` with `PairScorer` on an actor pool
     (one GPU per actor with `use_gpu`, CPU actors otherwise)
  -> the driver streams the scored rows, in input order, into one output file per input file.

A file's output appears (by an atomic rename) only once all its rows are written, so `resume`
skips exactly the files that are done and never duplicates rows. Rejected rows go to the errors
file with their file, line and reason and are counted in the summary.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from raykit.config import ConfigError, ScoreConfig
from raykit.core.loading import local_model_path
from raykit.core.precision import describe_precision
from raykit.core.spec import check_reranker
from raykit.data.groups import expand_paths
from raykit.runtime.cluster import capacity, init_ray
from raykit.runtime.console import ACTOR_ARGS_NOTICE, dropped_stderr_lines, quiet_ray_data
from raykit.runtime.failures import user_error
from raykit.runtime.logs import is_verbose, logger
from raykit.runtime.storage import absolute, check_writable, filesystem
from raykit.scoring.inputs import (
    INPUT_SUFFIXES,
    READ_ROWS_PER_BLOCK,
    TOKENIZE_ROWS_PER_BATCH,
    read_input_file,
    tokenize_rows,
)
from raykit.scoring.outputs import (
    OrderedSinks,
    RunStats,
    count_input_rows,
    merge_error_parts,
    output_names,
    score_progress,
    update_progress,
)

# Ray Data merges what a task yields into blocks of up to its target_max_block_size (128 MiB by
# default), which would make the read stage hold a fifth of a million rows in one block.
MAX_BLOCK_BYTES = 8 * 2**20


class ScoreError(RuntimeError):
    """The run finished but must not count as a success (e.g. too many rejected rows)."""


try:
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps what torch frees after a window
    (activations of every shape), so without this a scoring actor's RSS creeps up over a run."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class PairScorer:
    """A scoring actor: an `InferenceEngine` per model, fed windows of tokenised pairs (each
    engine sorts a window by length and cuts it into chunks of at most `batch_size` pairs and
    `forward_token_budget` padded tokens). With several models (a teacher ensemble) a pair's
    score is the mean of their raw scores."""

    def __init__(self, cfg: ScoreConfig, models: list[str]):
        from raykit.core.engine import InferenceEngine
        from raykit.runtime.console import quiet_ray

        quiet_ray()  # Ray's deprecation notices in this actor, as on the driver

        compiles = cfg.compiles(cfg.device_type)
        self.engines = [
            InferenceEngine.from_config(
                cfg,
                model,
                use_gpu=cfg.use_gpu,
                threads=cfg.cpus_per_actor,
                max_batch_size=cfg.batch_size,
                # A package kept for the checkpoint is restored without loading the model.
                compiled_cache=cfg.compile_cache_dir() if compiles else None,
            )
            for model in models
        ]
        check_ensemble(models, [input_format(e.spec, e.tokenizer) for e in self.engines])
        if compiles:
            # The serving replicas' packages (one per checkpoint, precision, CPU and thread
            # count): auto restores a kept one, on compiles it first when none is kept.
            for engine in self.engines:
                engine.compile_model(cfg.compile_cache_dir(), build=cfg.compile == "on")

    def score(self, encodings: list[dict[str, list[int]]]) -> np.ndarray:
        scores = [engine.score_encodings(encodings) for engine in self.engines]
        return scores[0] if len(scores) == 1 else np.mean(scores, axis=0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = [c for c in ("input_ids", "token_type_ids") if c in batch.column_names]
        tokens = {c: batch[c].to_pylist() for c in columns}
        lengths = [len(ids) for ids in tokens["input_ids"]]
        scores = np.full(len(lengths), np.nan, dtype=np.float32)
        scored = [i for i, n in enumerate(lengths) if n]  # rejected rows carry no tokens
        if scored:
            encodings = [{c: tokens[c][i] for c in columns} for i in scored]
            scores[scored] = self.score(encodings)
        release_freed_memory()
        return (
            batch.drop_columns(columns)
            .append_column("score", pa.array(scores))
            .append_column("_tokens", pa.array(lengths, pa.int32()))
        )


def _compiling(cfg: ScoreConfig) -> str:
    """How the actors run the model, for the plan line."""
    if not cfg.compiles(cfg.device_type):
        return "eager"
    if cfg.compile == "on":
        return "compiled (a kept package, else compiled first)"
    return "compiled if a package is kept, else eager (--compile on builds one)"


def input_format(spec: Any, tokenizer: Any) -> tuple:
    """What decides a model's token ids for a pair: its prompt, token limits and vocabulary."""
    limits = (spec.max_len, spec.query_max_len, spec.passage_max_len)
    return spec.template, limits, tokenizer.get_vocab()


def check_ensemble(models: list[str], formats: list[tuple]) -> None:
    """Ensemble members score the same token ids: the rows are tokenised once, with the first
    model's tokenizer and prompt format."""
    for model, form in zip(models[1:], formats[1:], strict=True):
        if form != formats[0]:
            raise ConfigError(
                f"model: {model} does not share {models[0]}'s tokenizer and prompt format; an "
                "ensemble scores one tokenisation (e.g. fine-tunes of one base model)"
            )


def check_models(cfg: ScoreConfig) -> None:
    """On the driver: each model loads and has a trained head; an ensemble of local models
    shares one tokenisation (remote members are checked by the actors that copy them)."""
    from raykit.scoring.inputs import cached_tokenizer

    specs = [check_reranker(model, cfg) for model in cfg.model]
    local = [(m, spec) for m, spec in zip(cfg.model, specs, strict=True) if spec is not None]
    if len(local) > 1:
        paths = [local_model_path(m) for m, _ in local]
        formats = [
            input_format(spec, cached_tokenizer(path, cfg.trust_remote_code))
            for (_, spec), path in zip(local, paths, strict=True)
        ]
        check_ensemble([m for m, _ in local], formats)


def check_inputs(cfg: ScoreConfig) -> tuple[list[str], list[str], list[int]]:
    """Everything that can be checked before Ray starts (options, hardware, models, where the
    output goes), each failure one line; returns `plan_files`."""
    cfg.check_paths()
    cfg.check_hardware(cfg.use_gpu)
    check_models(cfg)
    check_writable(cfg.output, "output")
    if cfg.errors_path:
        check_writable(os.path.dirname(absolute(cfg.errors_path)), "errors_path")
    return plan_files(cfg)


def plan_files(cfg: ScoreConfig) -> tuple[list[str], list[str], list[int]]:
    """(input files, output names, indices still to do); refuses to clobber without a flag."""
    files = expand_paths(cfg.input, suffixes=INPUT_SUFFIXES)
    names = output_names(files, ".parquet" if cfg.format == "parquet" else ".jsonl")
    if len(set(names)) != len(names):
        raise ConfigError("input: two input files map to the same output name")
    fs, root = filesystem(cfg.output)
    done = [fs.get_file_info(f"{root}/{n}").type == pafs.FileType.File for n in names]
    if any(done) and not (cfg.resume or cfg.overwrite):
        first = names[done.index(True)]
        raise ConfigError(
            f"output: {cfg.output}/{first} exists; use --resume to skip finished files "
            "or --overwrite to replace them"
        )
    todo = [i for i, is_done in enumerate(done) if not (is_done and cfg.resume)]
    return files, names, todo


def build_dataset(cfg: ScoreConfig, files: list[str], todo: list[int]) -> ray.data.Dataset:
    """read -> tokenise (CPU tasks) -> score (actor pool), rows kept in input order."""
    model_path = local_model_path(cfg.model[0])  # an ensemble shares its tokenizer
    low, high = cfg.actor_pool_size
    # A fixed number of CPU tasks: Ray Data would otherwise start one per free CPU while the
    # actors load, and every worker process it starts stays for the run with a tokenizer loaded.
    cpu_tasks = ray.data.TaskPoolStrategy(size=cfg.tokenize_tasks or max(2, high))
    items = [{"file_index": i, "path": files[i]} for i in todo]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_input_file, batch_size=1, batch_format="pyarrow", num_cpus=0.5, compute=cpu_tasks
        )
        # Streaming repartitions by row count: blocks of a known size are the unit of parallel
        # work, of retry after an actor dies, and of progress at the driver.
        .repartition(target_num_rows_per_block=READ_ROWS_PER_BLOCK)
        .map_batches(
            tokenize_rows,
            batch_size=TOKENIZE_ROWS_PER_BATCH,
            batch_format="pyarrow",
            fn_kwargs={"cfg": cfg, "model_path": model_path},
            num_cpus=0.5,
            compute=cpu_tasks,
        )
        .repartition(target_num_rows_per_block=cfg.sort_window)
        .map_batches(
            PairScorer,
            batch_size=cfg.sort_window,
            batch_format="pyarrow",
            fn_constructor_kwargs={"cfg": cfg, "models": cfg.model},
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=1 if cfg.use_gpu else 0,
        )
    )


def run_score(cfg: ScoreConfig, launched_at: float | None = None) -> dict[str, Any]:
    """Score every input row once; returns (and prints) the run summary. `launched_at`: when
    the user launched the command (the CLI's process start), which `first_output_s` counts
    from; by default, this call."""
    files, names, todo = check_inputs(cfg)
    skipped = len(files) - len(todo)
    if skipped:
        logger.info(f"resume: {skipped} of {len(files)} file(s) already scored")
    stats = RunStats()
    started = launched_at or time.time()
    first_output = _score_files(cfg, files, names, todo, stats, started) if todo else None
    errors_file = merge_error_parts(cfg, names)
    wall = time.time() - started
    rejected = sum(stats.rejected.values())
    summary = {
        "files": len(files),
        "files_skipped": skipped,
        "rows_in": stats.rows_in,
        "rows_out": stats.rows_out,
        "rows_rejected": rejected,
        "rejected_reasons": dict(stats.rejected),
        "pairs_scored": stats.pairs_scored,
        "wall_s": round(wall, 2),
        "pairs_per_s": round(stats.pairs_scored / wall, 1) if wall else 0.0,
        "tokens_per_s": round(stats.tokens_scored / wall, 1) if wall else 0.0,
        "first_output_s": round(first_output - started, 2) if first_output else None,
        "output": cfg.output,
        "errors_path": errors_file,
    }
    logger.info("score summary: " + json.dumps(summary))
    if stats.rows_in and rejected / stats.rows_in > cfg.max_error_rate:
        raise ScoreError(
            f"{rejected} of {stats.rows_in} rows rejected ({rejected / stats.rows_in:.2%}) > "
            f"max_error_rate {cfg.max_error_rate:.2%}; see {errors_file}"
        )
    return summary


def _stream_into(
    sinks: OrderedSinks, dataset: Any, progress: Any, stats: RunStats, started: float
) -> float | None:
    """Write the scored blocks, in input order, into their files; when the first came."""
    first_output = None
    # No prefetching: a prefetching iterator hands out a block only once the next one is ready
    # too, which held the first scores back by a whole window (7 s on CPU).
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        if first_output is None:  # startup: Ray Data, actors, model load, first window
            first_output = time.time()
            logger.info(f"first scores after {first_output - started:.1f} s")
        for file_index in pa.compute.unique(batch["_file"]).to_pylist():
            part = batch.filter(pa.compute.equal(batch["_file"], file_index))
            sinks.get(file_index).add(part)
        update_progress(progress, stats)
    return first_output


def _score_files(
    cfg: ScoreConfig,
    files: list[str],
    names: list[str],
    todo: list[int],
    stats: RunStats,
    started: float,
) -> float | None:
    """Start Ray, size the actor pool and stream the `todo` files through it into their output
    files; returns when the first scores reached the driver."""
    local = init_ray(cfg.ray_cpus())
    quiet_ray_data()
    cap = capacity(local)
    cfg = cfg.sized_for(cap.total_cpus, cap.gpus, local)
    low, high = cfg.actor_pool_size
    device = "GPU" if cfg.use_gpu else f"{cfg.cpus_per_actor:g} CPU"
    actors = f"{low}-{high}" if low != high else str(high)
    precision = describe_precision(cfg.precision, "cuda" if cfg.use_gpu else "cpu")
    logger.info(f"scoring with {actors} actor(s) x {device}, {precision}, {_compiling(cfg)}")
    # Rows must reach the driver in input order: that is how a file is known to be complete.
    context = ray.data.DataContext.get_current()
    options = context.execution_options
    saved = options.preserve_order, options.resource_limits, context.target_max_block_size
    bars = context.enable_progress_bars
    context.enable_progress_bars = is_verbose()  # else our progress line, one per interval
    options.preserve_order = True
    # Bounded blocks in flight: the streaming executor backpressures reads and tokenising
    # once this much waits in the object store, so memory is bounded whatever the input size.
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=cfg.object_store_limit_mib * 2**20
    )
    context.target_max_block_size = MAX_BLOCK_BYTES
    dataset = build_dataset(cfg, files, todo)
    sinks = OrderedSinks(cfg, files, names, todo, stats)
    progress = score_progress(len(todo), count_input_rows([files[i] for i in todo]))
    try:
        with dropped_stderr_lines(ACTOR_ARGS_NOTICE):
            first_output = _stream_into(sinks, dataset, progress, stats, started)
        sinks.finish_all()
    except Exception as exc:
        cause = user_error(exc)
        if cause is not None and cause is not exc:
            raise cause from None
        raise
    finally:
        progress.close()
        options.preserve_order, options.resource_limits, context.target_max_block_size = saved
        context.enable_progress_bars = bars
    return first_output

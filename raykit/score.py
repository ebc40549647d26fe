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
import functools
import json
import os
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from raykit.cluster import init_ray
from raykit.config import ConfigError, ScoreConfig
from raykit.data import (
    DataError,
    chunk_by_length,
    expand_paths,
    lone_surrogate,
    pad_encodings,
    read_lines,
    tokenize_pairs,
)
from raykit.model import batch_logits, check_model, local_model_path, sigmoid
from raykit.storage import absolute, check_writable, filesystem

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# Rows per block out of the read and tokenise stages. Ray keeps some state per block for the
# Dataset's lifetime (stats, task events), so blocks are few and big; the scoring stage's unit
# of work is --sort_window rows.
READ_ROWS_PER_BLOCK = 4096
TOKENIZE_ROWS_PER_BATCH = 2048
# Ray Data merges what a task yields into blocks of up to its target_max_block_size (128 MiB by
# default), which would make the read stage hold a fifth of a million rows in one block.
MAX_BLOCK_BYTES = 8 * 2**20
ERRORS_DIR = "_errors"  # per-file error parts; readers of the output skip "_" paths


class ScoreError(RuntimeError):
    """The run finished but must not count as a success (e.g. too many rejected rows)."""


# ---------------------------------------------------------------------------- model files


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------- read


def read_input_file(batch: pa.Table) -> Iterator[pa.Table]:
    """Stream one input file as blocks of (_file, _line, _json, _problem); `_json` is the row as
    JSON text, `_problem` says why a line could not even be decoded (else null)."""
    for file_index, path in zip(
        batch["file_index"].to_pylist(), batch["path"].to_pylist(), strict=True
    ):
        rows: list[tuple[int, str, str | None]] = []
        for row in _file_rows(path):
            rows.append(row)
            if len(rows) == READ_ROWS_PER_BLOCK:
                yield _read_block(file_index, rows)
                rows = []
        if rows:
            yield _read_block(file_index, rows)


def _file_rows(path: str) -> Iterator[tuple[int, str, str | None]]:
    if not path.endswith(".parquet"):
        yield from read_lines(path)
        return
    try:
        fs, fs_path = filesystem(path)
        parquet = pq.ParquetFile(fs.open_input_file(fs_path))
        number = 0
        for record_batch in parquet.iter_batches(batch_size=READ_ROWS_PER_BLOCK):
            for row in record_batch.to_pylist():
                number += 1
                yield number, json.dumps(row, ensure_ascii=False, default=str), None
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def _read_block(file_index: int, rows: list[tuple[int, str, str | None]]) -> pa.Table:
    return pa.table({
        "_file": pa.array([file_index] * len(rows), pa.int32()),
        "_line": pa.array([n for n, _, _ in rows], pa.int64()),
        "_json": pa.array([t for _, t, _ in rows], pa.string()),
        "_problem": pa.array([p for _, _, p in rows], pa.string()),
    })  # fmt: skip


# ---------------------------------------------------------------------------- tokenise


def _field_with_lone_surrogate(row: dict) -> str | None:
    """The first column whose value (or name) holds a lone surrogate escape such as "\\ud800":
    valid JSON, but no tokenizer, Arrow column or UTF-8 file takes it."""

    def bad(value: Any) -> bool:
        if isinstance(value, str):
            return lone_surrogate(value)
        if isinstance(value, list):
            return any(bad(v) for v in value)
        if isinstance(value, dict):
            return any(bad(k) or bad(v) for k, v in value.items())
        return False

    return next((key for key, value in row.items() if bad(key) or bad(value)), None)


def check_row(row: Any, cfg: ScoreConfig) -> tuple[list[str] | None, str | None]:
    """(passages, None) for a valid pair or group row, else (None, reason)."""
    if not isinstance(row, dict):
        return None, "not a JSON object"
    broken = _field_with_lone_surrogate(row)
    if broken is not None:
        return None, f"field '{broken}' is not valid Unicode (a lone surrogate escape)"
    query = row.get(cfg.query_field)
    if query is None:
        return None, f"missing field '{cfg.query_field}'"
    if not isinstance(query, str):
        return None, f"field '{cfg.query_field}' is not a string"
    if cfg.group_by and row.get(cfg.group_by) is None:
        return None, f"missing field '{cfg.group_by}' (group_by)"
    if cfg.candidates_field in row:
        candidates = row[cfg.candidates_field]
        if not isinstance(candidates, list) or not candidates:
            return None, f"field '{cfg.candidates_field}' is not a non-empty list"
        for i, text in enumerate(candidates):
            if not isinstance(text, str):
                return None, f"field '{cfg.candidates_field}[{i}]' is not a string"
            if not text.strip():
                return None, f"field '{cfg.candidates_field}[{i}]' is empty"
        return candidates, None
    passage = row.get(cfg.passage_field)
    if passage is None:
        return None, f"missing field '{cfg.passage_field}' (or '{cfg.candidates_field}')"
    if not isinstance(passage, str):
        return None, f"field '{cfg.passage_field}' is not a string"
    if not passage.strip():
        return None, f"field '{cfg.passage_field}' is empty"
    return [passage], None


def tokenize_rows(batch: pa.Table, cfg: ScoreConfig, model_path: str) -> pa.Table:
    """Validate rows and tokenise one pair per row, or one per candidate of a group row.

    Output columns: _file, _line, _json (on a row's first pair only), _cand (candidate index,
    -1 for a pair row), _error (reason, or null), input_ids, token_type_ids (if the model has them).
    """
    tokenizer = _tokenizer(model_path, cfg.trust_remote_code)
    columns_in = ("_file", "_line", "_json", "_problem")
    files, lines, texts, problems = (batch[c].to_pylist() for c in columns_in)
    out: dict[str, list] = {k: [] for k in ("_file", "_line", "_json", "_cand", "_error")}
    queries, passages = [], []
    for file_index, line, text, problem in zip(files, lines, texts, problems, strict=True):
        try:
            if problem is not None:
                raise ValueError(problem)
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            row, reason = None, f"invalid JSON: {exc.msg}"
        except (ValueError, RecursionError) as exc:
            row, reason = None, str(exc) if problem else "invalid JSON: nested too deeply"
        else:
            passages_of_row, reason = check_row(row, cfg)
        if reason is not None:
            _append(out, file_index, line, text, -1, reason)
            queries.append(None)
            passages.append(None)
            continue
        is_group = cfg.candidates_field in row
        for i, passage in enumerate(passages_of_row):
            _append(out, file_index, line, text if i == 0 else None, i if is_group else -1, None)
            queries.append(row[cfg.query_field])
            passages.append(passage)
    valid = [i for i, q in enumerate(queries) if q is not None]
    encodings = tokenize_pairs(
        tokenizer, [queries[i] for i in valid], [passages[i] for i in valid],
        cfg.max_len, cfg.query_max_len, cfg.passage_max_len,
    ) if valid else []  # fmt: skip
    keys = list(encodings[0]) if encodings else ["input_ids"]
    columns = {k: [[] for _ in queries] for k in keys}
    for i, encoding in zip(valid, encodings, strict=True):
        for k in keys:
            columns[k][i] = encoding[k]
    table = pa.table({
        "_file": pa.array(out["_file"], pa.int32()),
        "_line": pa.array(out["_line"], pa.int64()),
        "_json": pa.array(out["_json"], pa.string()),
        "_cand": pa.array(out["_cand"], pa.int32()),
        "_error": pa.array(out["_error"], pa.string()),
    })  # fmt: skip
    for k in keys:
        kind = pa.int32() if k == "input_ids" else pa.int8()
        table = table.append_column(k, pa.array(columns[k], pa.list_(kind)))
    return table


def _append(out: dict, file_index: int, line: int, text: str | None, cand: int, error) -> None:
    out["_file"].append(file_index)
    out["_line"].append(line)
    out["_json"].append(text)
    out["_cand"].append(cand)
    out["_error"].append(error)


# ---------------------------------------------------------------------------- score


class PairScorer:
    """A scoring actor: holds the model and scores a window of tokenised pairs in chunks of
    similar length (at most `batch_size` pairs and `forward_token_budget` padded tokens)."""

    def __init__(self, cfg: ScoreConfig, model: str):
        import torch

        from raykit.model import load_model_and_tokenizer

        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.device = torch.device("cuda" if cfg.use_gpu else "cpu")
        hf_model, tokenizer = load_model_and_tokenizer(model, cfg.trust_remote_code)
        self.model = hf_model.to(self.device).eval()
        self.pad_id = tokenizer.pad_token_id or 0
        self.cfg = cfg
        on_gpu = self.device.type == "cuda"
        self.dtype = None  # autocast only on GPU; on CPU fp16 is emulated and slow
        if on_gpu and (cfg.fp16 or cfg.bf16):
            self.dtype = torch.float16 if cfg.fp16 else torch.bfloat16

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = [c for c in ("input_ids", "token_type_ids") if c in batch.column_names]
        tokens = {c: batch[c].to_pylist() for c in columns}
        lengths = [len(ids) for ids in tokens["input_ids"]]
        scores = np.full(len(lengths), np.nan, dtype=np.float32)
        scored = [i for i, n in enumerate(lengths) if n]  # rejected rows carry no tokens
        budget, most = self.cfg.forward_token_budget, self.cfg.batch_size
        for chunk in chunk_by_length([lengths[i] for i in scored], budget, max_items=most):
            index = [scored[j] for j in chunk]
            inputs = pad_encodings([{c: tokens[c][i] for c in columns} for i in index],
                                   self.pad_id)  # fmt: skip
            scores[index] = batch_logits(self.model, inputs, self.dtype).numpy()
        release_freed_memory()
        return (
            batch.drop_columns(columns)
            .append_column("score", pa.array(scores))
            .append_column("_tokens", pa.array(lengths, pa.int32()))
        )


try:
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps what torch frees after a window
    (activations of every shape), so without this a scoring actor's RSS creeps up over a run."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# ---------------------------------------------------------------------------- write


def output_names(files: list[str], suffix: str) -> list[str]:
    """One output name per input: its base name, or its path below the inputs' common directory
    when base names repeat; the input suffix is replaced by `suffix`."""

    def strip(name: str) -> str:
        for ending in INPUT_SUFFIXES:
            if name.endswith(ending):
                return name[: -len(ending)]
        return name

    bare = [f.split("://", 1)[-1] for f in files]
    names = [strip(os.path.basename(p)) for p in bare]
    if len(set(names)) < len(names):
        root = os.path.commonpath([os.path.dirname(p) for p in bare])
        names = [strip(os.path.relpath(p, root)) for p in bare]
    return [n + suffix for n in names]


def _conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Cast a batch to the file's schema (columns missing here become nulls)."""
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise DataError(
            f"{where}: column(s) {extra} first appear after the first rows; Parquet output needs "
            "one schema per file (use --format jsonl)"
        )
    columns = []
    for column in schema:
        if column.name not in table.column_names:
            columns.append(pa.nulls(len(table), column.type))
            continue
        try:
            columns.append(table[column.name].cast(column.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"{where}: column '{column.name}': {exc}") from None
    return pa.Table.from_arrays(columns, schema=schema)


class TableWriter:
    """Appends tables to one Parquet or JSONL file on any pyarrow filesystem."""

    def __init__(self, fs: pafs.FileSystem, path: str, fmt: str, where: str):
        self.fs, self.path, self.fmt, self.where = fs, path, fmt, where
        self.stream = fs.open_output_stream(path)
        self.parquet: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.fmt == "jsonl":
            lines = "".join(
                json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in table.to_pylist()
            )
            self.stream.write(lines.encode("utf-8"))
        else:
            if self.parquet is None:
                schema = pa.schema([
                    f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                    for f in table.schema
                ])  # fmt: skip
                self.parquet = pq.ParquetWriter(self.stream, schema)
            self.parquet.write_table(_conform(table, self.parquet.schema, self.where))
        self.rows += len(table)

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        elif self.fmt == "parquet":
            pq.write_table(pa.table({}), self.stream)
        self.stream.close()


@dataclass
class RunStats:
    rows_in: int = 0
    rows_out: int = 0
    pairs_scored: int = 0
    tokens_scored: int = 0
    rejected: Counter = field(default_factory=Counter)


def rank_within_queries(query: np.ndarray, score: np.ndarray) -> np.ndarray:
    """1-based rank of each row by descending score within its query number (ties keep input
    order); 0 for rows whose query number is -1."""
    order = np.lexsort((-score, query))  # stable: by query, then score, then position
    sorted_query = query[order]
    starts = np.flatnonzero(np.r_[True, sorted_query[1:] != sorted_query[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    ranks = np.zeros(len(query), dtype=np.int32)
    ranks[order] = np.arange(len(order)) - np.repeat(starts, sizes) + 1
    ranks[query < 0] = 0
    return ranks


class FileSink:
    """Turns the scored stream of one input file into its output file and its error records.

    Rows are written to a hidden in-progress file that is renamed into place at `finish`. When
    rows are ranked (groups, or `group_by`), the first pass keeps only each row's query key and
    score in memory and a second pass over the in-progress file adds `rank` and applies `top_k`.
    """

    def __init__(self, cfg: ScoreConfig, source: str, name: str, stats: RunStats):
        self.cfg, self.source, self.stats = cfg, source, stats
        self.fs, root = filesystem(cfg.output)
        self.final = f"{root}/{name}"
        directory, base = os.path.split(self.final)
        self.fs.create_dir(directory, recursive=True)
        self.partial = f"{directory}/.{base}.inprogress"
        self.error_part = f"{root}/{ERRORS_DIR}/{name}.jsonl"
        self.fs.create_dir(os.path.dirname(self.error_part), recursive=True)
        self.errors = self.fs.open_output_stream(self.error_part)
        self.ranked = False
        self.rows_added = 0
        # What the ranking pass needs, 8 bytes a row once a row has a query key: the row's query
        # number (-1: no query key) and its score; plus one entry per distinct query.
        self.query_numbers: dict[Any, int] = {}
        self.row_query = array("i")
        self.row_score = array("f")
        self.writer: TableWriter | None = None
        self.group_row: tuple[int, dict] | None = None

    def add(self, batch: pa.Table) -> None:
        cfg = self.cfg
        errors = batch["_error"].to_pylist()
        lines, cands = batch["_line"].to_pylist(), batch["_cand"].to_pylist()
        texts, scores = batch["_json"].to_pylist(), batch["score"].to_numpy(zero_copy_only=False)
        rows, records = [], []
        for line, cand, text, score, error in zip(lines, cands, texts, scores, errors, strict=True):
            if error is not None:
                self.stats.rows_in += 1
                self.stats.rejected[error] += 1
                records.append(self._error_record(line, text, error))
                continue
            if text is not None:
                self.stats.rows_in += 1
                parsed = json.loads(text)
                self.group_row = (line, parsed)
            _, parsed = self.group_row
            row = dict(parsed)
            key = None
            if cand >= 0:
                passage = row.pop(cfg.candidates_field)[cand]
                row[cfg.passage_field] = passage
                row["candidate_index"] = cand
                key = ("line", line)
            if cfg.group_by:
                key = ("key", json.dumps(row[cfg.group_by], default=str))
            row["score"] = float(score)
            if cfg.normalize:
                row["normalized_score"] = sigmoid(float(score))
            rows.append(row)
            if key is not None and not self.ranked:  # groups, or group_by: a second pass adds rank
                self.ranked = True
                self.row_query.extend(array("i", [-1]) * self.rows_added)
                self.row_score.extend(array("f", [0.0]) * self.rows_added)
            if self.ranked:
                numbers = self.query_numbers
                self.row_query.append(-1 if key is None else numbers.setdefault(key, len(numbers)))
                self.row_score.append(score)
            self.rows_added += 1
        valid = batch.filter(pa.compute.is_null(batch["_error"]))
        self.stats.pairs_scored += len(valid)
        self.stats.tokens_scored += int(pa.compute.sum(valid["_tokens"]).as_py() or 0)
        if records:
            self.errors.write("".join(json.dumps(r, default=str) + "\n" for r in records).encode())
        if rows:
            if self.writer is None:
                # Ranked output needs a second pass, so the first one always writes Parquet.
                first_format = "parquet" if self.ranked else cfg.format
                self.writer = TableWriter(self.fs, self.partial, first_format, self.source)
            # Every column any row has (from_pylist would keep only the first row's keys).
            names = dict.fromkeys(name for row in rows for name in row)
            self.writer.write(pa.table({n: [row.get(n) for row in rows] for n in names}))

    def _error_record(self, line: int, text: str, reason: str) -> dict:
        try:
            row: Any = json.loads(text)
        except (ValueError, RecursionError):
            row = text
        return {"file": self.source, "line": line, "reason": reason, "row": row}

    def finish(self) -> None:
        self.errors.close()
        unranked = self.row_query.count(-1) if self.ranked else self.rows_added
        if self.cfg.top_k and unranked:
            print(f"[raykit] {self.source}: top_k does not apply to {unranked} pair row(s) "
                  "without a query key; pass --group_by (e.g. query_id)", flush=True)  # fmt: skip
        if self.writer is None:  # no valid rows: an empty output file
            self.writer = TableWriter(self.fs, self.partial, self.cfg.format, self.source)
        self.writer.close()
        if self.writer.fmt == "parquet" and self.ranked:
            self._rank_and_rewrite()
        else:
            self.stats.rows_out += self.writer.rows
        self.fs.move(self.partial, self.final)

    def _rank_and_rewrite(self) -> None:
        """Second pass: add each row's rank within its query and keep the top_k."""
        ranks = rank_within_queries(
            np.frombuffer(self.row_query, dtype=np.int32),
            np.frombuffer(self.row_score, dtype=np.float32),
        )
        ranked_path = self.partial + ".ranked"
        writer = TableWriter(self.fs, ranked_path, self.cfg.format, self.source)
        position = 0
        with self.fs.open_input_file(self.partial) as handle:
            for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=8192):
                table = pa.Table.from_batches([record_batch])
                rank = ranks[position : position + len(table)]
                position += len(table)
                table = table.append_column("rank", pa.array(np.where(rank > 0, rank, None)))
                if self.cfg.top_k:
                    table = table.filter(pa.array((rank == 0) | (rank <= self.cfg.top_k)))
                writer.write(table)
        writer.close()
        self.stats.rows_out += writer.rows
        self.fs.delete_file(self.partial)
        self.fs.move(ranked_path, self.partial)


# ---------------------------------------------------------------------------- run


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
    model_path = local_model_path(cfg.model)
    low, high = cfg.actor_pool_size
    # A fixed number of CPU tasks: Ray Data would otherwise start one per free CPU while the
    # actors load, and every worker process it starts stays for the run with a tokenizer loaded.
    cpu_tasks = ray.data.TaskPoolStrategy(size=cfg.tokenize_tasks or max(2, high))
    items = [{"file_index": i, "path": files[i]} for i in todo]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_input_file, batch_size=1, batch_format="pyarrow", num_cpus=0.5, compute=cpu_tasks
        )  # fmt: skip
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
            fn_constructor_kwargs={"cfg": cfg, "model": cfg.model},
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=1 if cfg.use_gpu else 0,
        )
    )


def _unwrap(exc: BaseException) -> BaseException:
    """The DataError/ConfigError behind Ray's task-error wrappers, if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ray.exceptions.RayTaskError):  # also an instance of its cause's type
            seen = seen.cause
            continue
        if isinstance(seen, (DataError, ConfigError)):
            return seen
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return exc


def _merge_error_parts(cfg: ScoreConfig, names: list[str]) -> str | None:
    """Concatenate every input file's error records (in input order) into the errors file."""
    fs, root = filesystem(cfg.output)
    target = cfg.errors_path or f"{cfg.output.rstrip('/')}/_errors.jsonl"
    target_fs, target_path = filesystem(target)
    parts = [f"{root}/{ERRORS_DIR}/{n}.jsonl" for n in names]
    parts = [p for p in parts if fs.get_file_info(p).type == pafs.FileType.File]
    if not any(fs.get_file_info(p).size for p in parts):
        if target_fs.get_file_info(target_path).type == pafs.FileType.File:
            target_fs.delete_file(target_path)
        return None
    target_fs.create_dir(os.path.dirname(target_path), recursive=True)
    with target_fs.open_output_stream(target_path) as out:
        for part in parts:
            with fs.open_input_stream(part) as handle:
                out.write(handle.read())
    return target


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every input row once; returns (and prints) the run summary."""
    cfg.validate()
    check_model(cfg.model)
    check_writable(cfg.output, "output")
    if cfg.errors_path:
        check_writable(os.path.dirname(absolute(cfg.errors_path)), "errors_path")
    files, names, todo = plan_files(cfg)
    skipped = len(files) - len(todo)
    if skipped:
        print(f"[raykit] resume: {skipped} of {len(files)} file(s) already scored", flush=True)
    stats = RunStats()
    started = time.time()
    first_output: float | None = None
    if todo:
        init_ray(cfg.actor_pool_size[1] * cfg.cpus_per_actor + 1)
        # Rows must reach the driver in input order: that is how a file is known to be complete.
        context = ray.data.DataContext.get_current()
        options = context.execution_options
        saved = options.preserve_order, options.resource_limits, context.target_max_block_size
        options.preserve_order = True
        # Bounded blocks in flight: the streaming executor backpressures reads and tokenising
        # once this much waits in the object store, so memory is bounded whatever the input size.
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=cfg.object_store_limit_mib * 2**20
        )
        context.target_max_block_size = MAX_BLOCK_BYTES
        dataset = build_dataset(cfg, files, todo)
        sinks = OrderedSinks(cfg, files, names, todo, stats)
        progress = Progress(len(todo))
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                if first_output is None:  # startup: Ray Data, actors, model load, first window
                    first_output = time.time()
                for file_index in pa.compute.unique(batch["_file"]).to_pylist():
                    part = batch.filter(pa.compute.equal(batch["_file"], file_index))
                    sinks.get(file_index).add(part)
                progress.update(len(batch), stats)
            sinks.finish_all()
        except Exception as exc:
            cause = _unwrap(exc)
            if cause is not exc:
                raise cause from None
            raise
        finally:
            progress.close()
            options.preserve_order, options.resource_limits, context.target_max_block_size = saved
    errors_file = _merge_error_parts(cfg, names)
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
    print("[raykit] score summary: " + json.dumps(summary), flush=True)
    if stats.rows_in and rejected / stats.rows_in > cfg.max_error_rate:
        raise ScoreError(
            f"{rejected} of {stats.rows_in} rows rejected ({rejected / stats.rows_in:.2%}) > "
            f"max_error_rate {cfg.max_error_rate:.2%}; see {errors_file}"
        )
    return summary


class OrderedSinks:
    """The open output file. Rows arrive in input order, so when rows of a later file show up
    every earlier file is complete (files with no rows at all get an empty output)."""

    def __init__(self, cfg, files: list[str], names: list[str], todo: list[int], stats: RunStats):
        self.cfg, self.files, self.names, self.stats = cfg, files, names, stats
        self.pending = list(todo)
        self.current: tuple[int, FileSink] | None = None

    def get(self, file_index: int) -> FileSink:
        if self.current is not None and self.current[0] == file_index:
            return self.current[1]
        if file_index not in self.pending:
            raise RuntimeError(f"rows of file #{file_index} arrived out of order")
        self._close_current()
        while self.pending[0] != file_index:
            self._open(self.pending.pop(0)).finish()
        self.pending.pop(0)
        self.current = (file_index, self._open(file_index))
        return self.current[1]

    def finish_all(self) -> None:
        self._close_current()
        while self.pending:
            self._open(self.pending.pop(0)).finish()

    def _open(self, index: int) -> FileSink:
        return FileSink(self.cfg, self.files[index], self.names[index], self.stats)

    def _close_current(self) -> None:
        if self.current is not None:
            self.current[1].finish()
            self.current = None


class Progress:
    """A tqdm bar of rows/s on stderr (plain log lines when not a terminal)."""

    def __init__(self, files: int):
        from tqdm import tqdm

        self.bar = tqdm(total=None, unit="pairs", desc=f"scoring {files} file(s)",
                        file=sys.stderr, mininterval=5.0, disable=None)  # fmt: skip
        self.last_log = time.time()
        self.started = time.time()

    def update(self, pairs: int, stats: RunStats) -> None:
        self.bar.update(pairs)
        if self.bar.disable and time.time() - self.last_log > 30:
            rate = stats.pairs_scored / max(1e-9, time.time() - self.started)
            print(f"[raykit] scored {stats.pairs_scored} pairs ({rate:.1f} pairs/s)", flush=True)
            self.last_log = time.time()

    def close(self) -> None:
        self.bar.close()

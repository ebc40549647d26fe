"""Writing `raykit score` output: the scored rows of each input file stream, in input order,
into one output file (renamed into place when complete), with its rejected rows in an errors
part; a second pass adds ranks and applies top_k where rows are ranked."""

from __future__ import annotations

import json
import os
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raykit.config import ScoreConfig
from raykit.core.activation import sigmoid_array
from raykit.data.groups import count_rows
from raykit.errors import DataError
from raykit.runtime.console import RowProgress, format_eta
from raykit.runtime.logs import logger
from raykit.runtime.storage import filesystem
from raykit.scoring.inputs import INPUT_SUFFIXES, is_training_group

ERRORS_DIR = "_errors"  # per-file error parts; readers of the output skip "_" paths


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
                schema = pa.schema(
                    [
                        f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                        for f in table.schema
                    ]
                )
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
        self.group_row: tuple[dict, bool] | None = None  # the row, and whether it is a teacher's
        self.teacher_scores: list[float | None] = []  # the training group being scored

    def add(self, batch: pa.Table) -> None:
        cfg = self.cfg
        errors = batch["_error"].to_pylist()
        lines, cands = batch["_line"].to_pylist(), batch["_cand"].to_pylist()
        texts, scores = batch["_json"].to_pylist(), batch["score"].to_numpy(zero_copy_only=False)
        normalized = sigmoid_array(scores) if cfg.normalize else scores  # one vectorised pass
        rows, records = [], []
        for line, cand, text, score, norm, error in zip(
            lines, cands, texts, scores, normalized, errors, strict=True
        ):
            if error is not None:
                self.stats.rows_in += 1
                self.stats.rejected[error] += 1
                records.append(self._error_record(line, text, error))
                continue
            if text is not None:
                self.stats.rows_in += 1
                parsed = json.loads(text)
                self.group_row = (parsed, is_training_group(parsed, cfg))
            parsed, teacher = self.group_row
            if cand >= 0 and teacher:
                done = self._add_teacher_score(parsed, cand, float(score))
                if done is not None:
                    rows.append(done)
                    self.rows_added += 1
                continue
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
                row["normalized_score"] = float(norm)
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

    def _add_teacher_score(self, group: dict, cand: int, score: float) -> dict | None:
        """Collect one passage's score; once the group's last arrives, the group with its
        `pos_scores`/`neg_scores` (raw, in the order of `pos`/`neg`) replacing any it had."""
        if cand == 0:
            self.teacher_scores = [None] * (len(group["pos"]) + len(group.get("neg", [])))
        self.teacher_scores[cand] = score
        if cand < len(self.teacher_scores) - 1:
            return None
        positives = len(group["pos"])
        scores, self.teacher_scores = self.teacher_scores, []
        return {**group, "pos_scores": scores[:positives], "neg_scores": scores[positives:]}

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
            logger.warning(
                f"{self.source}: top_k does not apply to {unranked} pair row(s) "
                "without a query key; pass --group_by (e.g. query_id)"
            )
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


def merge_error_parts(cfg: ScoreConfig, names: list[str]) -> str | None:
    """Concatenate every input file's error records (in input order) into the errors file. The
    per-file parts stay (a resumed run merges them again) unless every one is empty."""
    fs, root = filesystem(cfg.output)
    target = cfg.errors_path or f"{cfg.output.rstrip('/')}/_errors.jsonl"
    target_fs, target_path = filesystem(target)
    parts = [f"{root}/{ERRORS_DIR}/{n}.jsonl" for n in names]
    parts = [p for p in parts if fs.get_file_info(p).type == pafs.FileType.File]
    if not any(fs.get_file_info(p).size for p in parts):
        if target_fs.get_file_info(target_path).type == pafs.FileType.File:
            target_fs.delete_file(target_path)
        if fs.get_file_info(f"{root}/{ERRORS_DIR}").type == pafs.FileType.Directory:
            fs.delete_dir(f"{root}/{ERRORS_DIR}")  # nothing was rejected: no empty parts left
        return None
    target_fs.create_dir(os.path.dirname(target_path), recursive=True)
    with target_fs.open_output_stream(target_path) as out:
        for part in parts:
            with fs.open_input_stream(part) as handle:
                out.write(handle.read())
    return target


def count_input_rows(files: list[str]) -> int | None:
    """Rows in the inputs when cheap to know (local plain JSONL and Parquet), for the ETA;
    None when any file is compressed or remote."""
    if any(path.endswith(".gz") or "://" in path for path in files):
        return None
    return sum(count_rows(path) for path in files)


def progress_line(stats: RunStats, progress: RowProgress) -> Callable[[float | None], str]:
    """`raykit score`'s plain progress line: pairs scored and pairs/s, rows of the total."""
    rate = stats.pairs_scored / max(1e-9, time.time() - progress.started)

    def line(eta: float | None) -> str:
        done = f"{stats.rows_in} rows"
        if progress.total:
            done = f"{stats.rows_in}/{progress.total} rows, eta {format_eta(eta)}"
        return f"scored {stats.pairs_scored} pairs ({rate:.1f} pairs/s), {done}"

    return line


def update_progress(progress: RowProgress, stats: RunStats) -> None:
    rate = stats.pairs_scored / max(1e-9, time.time() - progress.started)
    progress.update(stats.rows_in, f"{rate:.1f} pairs/s", progress_line(stats, progress))


def score_progress(files: int, total_rows: int | None) -> RowProgress:
    """Input rows done, pairs/s and ETA: a bar on a terminal, else a line every 30 s."""
    return RowProgress(total_rows, f"scoring {files} file(s)", every=30.0, mininterval=5.0)

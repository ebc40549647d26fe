"""Reading `raykit score` input: one Ray Data task streams a file as blocks of raw rows (each
row keeps its file and line), and CPU tasks check each row and tokenise its pairs."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from raykit.config import ScoreConfig
from raykit.core.prompts import tokenize_for
from raykit.core.spec import RerankerSpec, SpecRequest, resolve_spec
from raykit.data.groups import lone_surrogate, read_rows

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# Rows per block out of the read and tokenise stages. Ray keeps some state per block for the
# Dataset's lifetime (stats, task events), so blocks are few and big; the scoring stage's unit
# of work is --sort_window rows.
READ_ROWS_PER_BLOCK = 4096
TOKENIZE_ROWS_PER_BATCH = 2048


@functools.lru_cache(maxsize=4)
def cached_tokenizer(model_path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=4)
def _spec(model_path: str, request: SpecRequest) -> RerankerSpec:
    """How the model scores (prompt, token limits), once per task (the driver has reported
    the overrides)."""
    return resolve_spec(model_path, request)


def read_input_file(batch: pa.Table) -> Iterator[pa.Table]:
    """Stream one input file as blocks of (_file, _line, _json, _problem); `_json` is the row as
    JSON text, `_problem` says why a line could not even be decoded (else null)."""
    for file_index, path in zip(
        batch["file_index"].to_pylist(), batch["path"].to_pylist(), strict=True
    ):
        rows: list[tuple[int, str, str | None]] = []
        for row in read_rows(path):
            rows.append(row)
            if len(rows) == READ_ROWS_PER_BLOCK:
                yield _read_block(file_index, rows)
                rows = []
        if rows:
            yield _read_block(file_index, rows)


def _read_block(file_index: int, rows: list[tuple[int, str, str | None]]) -> pa.Table:
    return pa.table(
        {
            "_file": pa.array([file_index] * len(rows), pa.int32()),
            "_line": pa.array([n for n, _, _ in rows], pa.int64()),
            "_json": pa.array([t for _, t, _ in rows], pa.string()),
            "_problem": pa.array([p for _, _, p in rows], pa.string()),
        }
    )


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


def is_training_group(row: dict, cfg: ScoreConfig) -> bool:
    """A training group {query, pos, neg?} (no passage or candidates field): scored as a
    teacher, its output row is the group with `pos_scores`/`neg_scores` added."""
    return "pos" in row and cfg.candidates_field not in row and cfg.passage_field not in row


def _check_texts(row: dict, name: str, required: bool) -> str | None:
    """Why `row[name]` is not a list of non-empty strings (non-empty when `required`), or None."""
    texts = row.get(name, None if required else [])
    if not isinstance(texts, list) or (required and not texts):
        return f"field '{name}' is not a {'non-empty ' if required else ''}list"
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            return f"field '{name}[{i}]' is not a string"
        if not text.strip():
            return f"field '{name}[{i}]' is empty"
    return None


def check_row(row: Any, cfg: ScoreConfig) -> tuple[list[str] | None, str | None]:
    """(passages, None) for a valid pair, group or training-group row, else (None, reason)."""
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
        reason = _check_texts(row, cfg.candidates_field, required=True)
        return (None, reason) if reason else (row[cfg.candidates_field], None)
    if is_training_group(row, cfg):
        reason = _check_texts(row, "pos", required=True) or _check_texts(row, "neg", False)
        return (None, reason) if reason else ([*row["pos"], *row.get("neg", [])], None)
    passage = row.get(cfg.passage_field)
    if passage is None:
        return None, f"missing field '{cfg.passage_field}' (or '{cfg.candidates_field}')"
    if not isinstance(passage, str):
        return None, f"field '{cfg.passage_field}' is not a string"
    if not passage.strip():
        return None, f"field '{cfg.passage_field}' is empty"
    return [passage], None


def _append(out: dict, file_index: int, line: int, text: str | None, cand: int, error) -> None:
    out["_file"].append(file_index)
    out["_line"].append(line)
    out["_json"].append(text)
    out["_cand"].append(cand)
    out["_error"].append(error)


def tokenize_rows(batch: pa.Table, cfg: ScoreConfig, model_path: str) -> pa.Table:
    """Validate rows and tokenise one pair per row, or one per candidate of a group row.

    Output columns: _file, _line, _json (on a row's first pair only), _cand (candidate index,
    -1 for a pair row), _error (reason, or null), input_ids, token_type_ids (if the model has them).
    """
    tokenizer = cached_tokenizer(model_path, cfg.trust_remote_code)
    spec = _spec(model_path, SpecRequest.of(cfg))
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
        is_group = cfg.candidates_field in row or is_training_group(row, cfg)
        for i, passage in enumerate(passages_of_row):
            _append(out, file_index, line, text if i == 0 else None, i if is_group else -1, None)
            queries.append(row[cfg.query_field])
            passages.append(passage)
    valid = [i for i, q in enumerate(queries) if q is not None]
    encodings = (
        tokenize_for(
            tokenizer,
            spec.template,
            [queries[i] for i in valid],
            [passages[i] for i in valid],
            spec.max_len,
            spec.query_max_len,
            spec.passage_max_len,
        )
        if valid
        else []
    )
    keys = list(encodings[0]) if encodings else ["input_ids"]
    columns = {k: [[] for _ in queries] for k in keys}
    for i, encoding in zip(valid, encodings, strict=True):
        for k in keys:
            columns[k][i] = encoding[k]
    table = pa.table(
        {
            "_file": pa.array(out["_file"], pa.int32()),
            "_line": pa.array(out["_line"], pa.int64()),
            "_json": pa.array(out["_json"], pa.string()),
            "_cand": pa.array(out["_cand"], pa.int32()),
            "_error": pa.array(out["_error"], pa.string()),
        }
    )
    for k in keys:
        kind = pa.int32() if k == "input_ids" else pa.int8()
        table = table.append_column(k, pa.array(columns[k], pa.list_(kind)))
    return table

"""Reading, validating and sampling training groups, and tokenising (query, passage) pairs.

A training record is one JSON object per line (or one Parquet row, numbered like a line):
    {"query": str, "pos": [str, ...], "neg": [str, ...],
     "pos_scores"?: [float, ...], "neg_scores"?: [float, ...]}

Every file is checked line by line in parallel Ray tasks, so a bad row is reported with its file,
line and field. For training that check runs beside the first steps (`stream_groups`): the rows
are counted first from the files' bytes (ten times faster than parsing them), which is all the
step plan needs, and training stops at the step where validation finds a bad row. The Ray Dataset
is read with the same line decoder (`read_lines`) and checks, so validation and reading agree on
every row; with `skip_invalid` the rows that failed the check are dropped and counted per reason
(then validation finishes before training, as the plan needs the count of valid rows).
"""

from __future__ import annotations

import codecs
import io
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raykit.errors import DataError
from raykit.runtime.logs import logger
from raykit.runtime.storage import filesystem, is_uri

if TYPE_CHECKING:
    import ray

GROUP_SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("pos", pa.list_(pa.string())),
        ("neg", pa.list_(pa.string())),
        ("pos_scores", pa.list_(pa.float64())),
        ("neg_scores", pa.list_(pa.float64())),
    ]
)
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
PARQUET_ROWS_PER_BATCH = 4096
MAX_REPORTED_ERRORS = 20
COUNT_CHUNK_BYTES = 2**20


@dataclass
class DataReport:
    """What the validation pass found, summed over files."""

    files: list[str] = field(default_factory=list)
    valid_rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    errors: list[str] = field(default_factory=list)  # first few "file:line: field: message"
    has_teacher_scores: bool = False

    @property
    def invalid_rows(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: DataReport) -> None:
        self.files += other.files
        self.valid_rows += other.valid_rows
        self.skipped.update(other.skipped)
        self.errors += other.errors[: max(0, MAX_REPORTED_ERRORS - len(self.errors))]
        self.has_teacher_scores |= other.has_teacher_scores

    def summary(self) -> str:
        text = f"{self.valid_rows} valid groups in {len(self.files)} file(s)"
        if self.has_teacher_scores:
            text += " with teacher scores (pos_scores/neg_scores)"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            text += f"; {self.invalid_rows} invalid ({reasons})"
        return text


# ---------------------------------------------------------------------------- files


def _hidden_below(root: str, path: str) -> bool:
    """Whether a name below `root` starts with "_" or "." (the Hadoop/Spark/Ray Data convention
    for side output such as a scoring run's `_errors/`, in-progress and checksum files)."""
    relative = path[len(root) :].strip("/")
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def expand_paths(
    paths: str | Sequence[str], suffixes: tuple[str, ...] = DATA_SUFFIXES
) -> list[str]:
    """Files behind a list of files, directories (searched recursively) and URIs, sorted.

    Inside directories only files ending in `suffixes` count, and never one below a file or folder
    name starting with "_" or "." (how many were passed over is logged).
    """
    if isinstance(paths, str):
        paths = [paths]
    files: list[str] = []
    for path in paths:
        fs, fs_path = filesystem(path)
        info = fs.get_file_info(fs_path)
        prefix = path.split("://", 1)[0] + "://" if is_uri(path) else ""
        if info.type == pafs.FileType.File:
            files.append(prefix + fs_path)
        elif info.type == pafs.FileType.Directory:
            listed = [
                f.path
                for f in fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
                if f.type == pafs.FileType.File and f.path.endswith(suffixes)
            ]
            found = sorted(prefix + p for p in listed if not _hidden_below(fs_path, p))
            if len(found) < len(listed):
                logger.info(
                    f"{path}: skipped {len(listed) - len(found)} file(s) under names starting "
                    'with "_" or "."'
                )
            if not found:
                raise DataError(f"{path}: directory has no {', '.join(suffixes)} files")
            files += found
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def read_lines(path: str) -> Iterator[tuple[int, str, str | None]]:
    """Every non-blank line of a JSONL file as (line number, text, problem), streaming.

    The one place that decodes input files, so that validation and reading agree: each line is
    decoded on its own, so a line that is not UTF-8 is one bad row (`problem` says where, and
    `text` shows it with the bad bytes escaped) rather than the end of the file. A UTF-8 BOM and
    CRLF line ends are accepted. An unreadable or truncated file raises a one-line DataError
    with the line reached.
    """
    fs, fs_path = filesystem(path)
    number = 0
    try:
        with fs.open_input_stream(fs_path, compression="detect") as stream:
            for number, raw in enumerate(io.BufferedReader(stream), start=1):
                if number == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    continue
                try:
                    yield number, raw.decode("utf-8"), None
                except UnicodeDecodeError as exc:
                    where = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
                    text = raw.decode("utf-8", errors="backslashreplace")
                    yield number, text, f"not valid UTF-8 ({where})"
    except OSError as exc:
        where = f"after line {number}" if number else "at the start"
        raise DataError(f"{path}: cannot read {where}: {exc}") from None


def read_rows(path: str) -> Iterator[tuple[int, str, str | None]]:
    """`read_lines` for JSONL, and for Parquet each row as JSON text numbered from 1 (what
    errors name as its line), streaming by row group."""
    if not path.endswith(".parquet"):
        yield from read_lines(path)
        return
    import pyarrow.parquet as pq

    fs, fs_path = filesystem(path)
    number = 0
    try:
        with fs.open_input_file(fs_path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=PARQUET_ROWS_PER_BATCH):
                for row in batch.to_pylist():
                    number += 1
                    yield number, json.dumps(row, ensure_ascii=False, default=str), None
    except (OSError, pa.ArrowInvalid) as exc:
        where = f"after row {number}" if number else "at the start"
        raise DataError(f"{path}: cannot read {where}: {exc}") from None


def count_rows(path: str) -> int:
    """Rows of one file as validation numbers them (non-blank lines; Parquet rows), from its
    bytes without parsing them: about a tenth of the time of the check."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, fs_path = filesystem(path)
        try:
            with fs.open_input_file(fs_path) as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{path}: cannot read at the start: {exc}") from None
    fs, fs_path = filesystem(path)
    rows = lines = 0
    tail = b""
    try:
        with fs.open_input_stream(fs_path, compression="detect") as stream:
            while chunk := stream.read(COUNT_CHUNK_BYTES):
                if not lines and not tail and chunk.startswith(codecs.BOM_UTF8):
                    chunk = chunk[len(codecs.BOM_UTF8) :]
                parts = (tail + chunk).split(b"\n")
                tail = parts.pop()
                lines += len(parts)
                rows += sum(1 for part in parts if part.strip())
    except OSError as exc:
        where = f"after line {lines}" if lines else "at the start"
        raise DataError(f"{path}: cannot read {where}: {exc}") from None
    return rows + bool(tail.strip())


def lone_surrogate(text: str) -> bool:
    """True when a decoded JSON string holds a lone surrogate (an escape such as "\\ud800"):
    valid JSON, but not text that a tokenizer, Arrow or a UTF-8 writer accepts."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------------------- validation


def check_group(record: Any, require_neg: bool = True) -> tuple[str, str, str] | None:
    """Return (reason, field, message) when a parsed JSON value is not a valid group.

    `require_neg=False` accepts groups without negatives (inputs of `raykit mine`).
    """
    if not isinstance(record, dict):
        return "not_an_object", "-", f"expected a JSON object, got {type(record).__name__}"
    if not require_neg and record.get("neg") is None:
        record = {**record, "neg": []}
    for name in ("query", "pos", "neg"):
        if name not in record:
            return "missing_field", name, "required field is missing"
    if not isinstance(record["query"], str):
        return "wrong_type", "query", f"expected a string, got {type(record['query']).__name__}"
    if not record["query"].strip():
        return "empty_query", "query", "query is empty"
    if lone_surrogate(record["query"]):
        return "invalid_text", "query", "not valid Unicode (a lone surrogate escape)"
    for name in ("pos", "neg"):
        texts = record[name]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return "wrong_type", name, "expected a list of strings"
        bad = next((i for i, t in enumerate(texts) if lone_surrogate(t)), None)
        if bad is not None:
            return "invalid_text", f"{name}[{bad}]", "not valid Unicode (a lone surrogate escape)"
        if not texts and (name == "pos" or require_neg):
            return f"empty_{name}", name, f"{name} has no passages"
        if any(not t.strip() for t in texts):
            return f"empty_{name}", name, f"{name} contains an empty passage"
    for name, texts in (("pos_scores", "pos"), ("neg_scores", "neg")):
        scores = record.get(name)
        if scores is None:
            continue
        if not isinstance(scores, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores
        ):
            return "wrong_type", name, "expected a list of numbers"
        if len(scores) != len(record[texts]):
            return (
                "scores_length",
                name,
                f"{len(scores)} scores for {len(record[texts])} {texts} passages",
            )
    if ("pos_scores" in record) != ("neg_scores" in record):
        missing = "neg_scores" if "pos_scores" in record else "pos_scores"
        return "missing_field", missing, "teacher scores need both pos_scores and neg_scores"
    return None


def parse_line(
    line: str, require_neg: bool = True
) -> tuple[dict | None, tuple[str, str, str] | None]:
    """Parse and check one JSONL line: (record, None) or (None, (reason, field, message))."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, ("invalid_json", "-", f"invalid JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return None, ("invalid_json", "-", "invalid JSON: nested too deeply")
    problem = check_group(record, require_neg)
    return (None, problem) if problem else (record, None)


def checked_lines(
    path: str, require_neg: bool = True
) -> Iterator[tuple[int, dict | None, tuple[str, str, str] | None]]:
    """(line number, record, None) or (line number, None, (reason, field, message)) for every
    non-blank line: what both the validation pass and the dataset read go by."""
    for number, line, problem in read_rows(path):
        if problem is not None:
            yield number, None, ("invalid_utf8", "-", problem)
        else:
            yield number, *parse_line(line, require_neg)


def check_file(path: str, require_neg: bool = True, keep: list[dict] | None = None) -> DataReport:
    """Check every line of one file, streaming; valid records are appended to `keep` if given."""
    report = DataReport(files=[path])
    for number, record, problem in checked_lines(path, require_neg):
        if problem is None:
            report.valid_rows += 1
            report.has_teacher_scores |= record.get("pos_scores") is not None
            if keep is not None:
                keep.append(record)
            continue
        reason, name, message = problem
        report.skipped[reason] += 1
        if len(report.errors) < MAX_REPORTED_ERRORS:
            report.errors.append(f"{path}:{number}: {name}: {message}")
    return report


def _file_task(check: Any, path: str) -> Any:
    """`check(path)` in a Ray task: a DataError is returned, not raised, so that the driver
    prints its one line rather than Ray's traceback."""
    try:
        return check(path)
    except DataError as exc:
        return exc


def _start_file_tasks(check: Any, files: Sequence[str]) -> list[ray.ObjectRef]:
    """`check` on every file, one light Ray task each, started now. An explicit "no placement
    group" keeps them out of the caller's placement group when called from a Tune trial (whose
    group holds a token CPU)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(num_cpus=0.25)(_file_task).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)
    )
    return [task.remote(check, path) for path in files]


def _raise_data_errors(results: Sequence[Any]) -> Sequence[Any]:
    """The file tasks' results, or the first unreadable file's DataError raised."""
    for result in results:
        if isinstance(result, DataError):
            raise result
    return results


def start_validation(files: Sequence[str]) -> list[ray.ObjectRef]:
    """One validation task per file, started now; each returns its file's DataReport."""
    return _start_file_tasks(check_file, files)


def merge_reports(report: DataReport, results: Sequence[DataReport | DataError]) -> DataReport:
    """Add finished validation results to `report`; an unreadable file raises its DataError."""
    for result in _raise_data_errors(results):
        report.merge(result)
    return report


def validate_files(files: Sequence[str]) -> DataReport:
    """Validate files in parallel Ray tasks and sum their reports."""
    import ray

    return merge_reports(DataReport(), ray.get(start_validation(files)))


def start_counts(files: Sequence[str]) -> list[ray.ObjectRef]:
    """One counting task per file (see `count_rows`), started now."""
    return _start_file_tasks(count_rows, files)


def file_rows(counts: Sequence[ray.ObjectRef]) -> list[int]:
    """The counting tasks' results, file by file; an unreadable file raises its DataError."""
    import ray

    return list(_raise_data_errors(ray.get(list(counts))))


# ---------------------------------------------------------------------------- datasets

READ_ROWS_PER_BLOCK = 1024
# Ray Data merges what a read task yields into blocks of up to its target_max_block_size (128 MiB
# by default): 70k groups, seconds of reading, before the first batch reaches a worker.
READ_BLOCK_BYTES = 4 * 2**20


def _records_to_table(records: list[dict]) -> pa.Table:
    columns = {name: [r.get(name) for r in records] for name in GROUP_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=GROUP_SCHEMA)


def _text_bytes(record: dict) -> int:
    return len(record["query"]) + sum(map(len, record["pos"])) + sum(map(len, record["neg"]))


def _blocks(records: Iterator[dict]) -> Iterator[pa.Table]:
    """`GROUP_SCHEMA` blocks of at most `READ_ROWS_PER_BLOCK` records or `READ_BLOCK_BYTES`."""
    block: list[dict] = []
    size = 0
    for record in records:
        block.append(record)
        size += _text_bytes(record)
        if len(block) == READ_ROWS_PER_BLOCK or size >= READ_BLOCK_BYTES:
            yield _records_to_table(block)
            block, size = [], 0
    if block:
        yield _records_to_table(block)


def _valid_records(path: str) -> Iterator[dict]:
    return (record for _, record, problem in checked_lines(path) if problem is None)


def _read_group_file(batch: pa.Table) -> Iterator[pa.Table]:
    """Ray Data read stage: the valid groups of one file."""
    (path,) = batch["path"].to_pylist()
    yield from _blocks(_valid_records(path))


# Files read side by side take turns of this many lines, each file kept at its share of the rows
# read so far; one reader reads at most `FILES_PER_READER` files (open at once).
INTERLEAVE_LINES = 16
FILES_PER_READER = 64


def interleaved_records(paths: Sequence[str], rows: Sequence[int]) -> Iterator[dict]:
    """The valid records of `paths` (with `rows` lines each, as counted), read side by side: the
    next lines always come from the file furthest behind its share, so every stretch of the
    stream mixes the files in proportion to their rows."""
    lines = [checked_lines(path) for path in paths]
    taken = [0] * len(paths)
    live = [i for i, count in enumerate(rows) if count > 0]
    while live:
        index = min(live, key=lambda i: taken[i] / rows[i])
        for _ in range(INTERLEAVE_LINES):
            item = next(lines[index], None)
            if item is None:
                live.remove(index)
                break
            taken[index] += 1
            _, record, problem = item
            if problem is None:
                yield record


def _read_interleaved(batch: pa.Table) -> Iterator[pa.Table]:
    """Ray Data read stage: the valid groups of several files, side by side."""
    (paths,), (rows,) = batch["paths"].to_pylist(), batch["rows"].to_pylist()
    yield from _blocks(interleaved_records(paths, rows))


def groups_dataset(files: Sequence[str], rows: Sequence[int] | None = None) -> ray.data.Dataset:
    """The valid groups of `files` as a Ray Dataset in small blocks.

    With each file's row count (`rows`), several files are read side by side
    (`interleaved_records`), so that training does not see one file after another (a folder of
    per-source files, as FlagEmbedding's recipes have) but a mix of all of them throughout each
    epoch; more than `FILES_PER_READER` files go to several readers, each taking every n-th file.
    Without counts: one read task per file, in order.
    """
    import ray

    if rows is None or len(files) == 1:
        items = [{"path": path} for path in files]
        read = _read_group_file
    else:
        readers = math.ceil(len(files) / FILES_PER_READER)
        items = [
            {"paths": list(files[i::readers]), "rows": list(rows[i::readers])}
            for i in range(readers)
        ]
        read = _read_interleaved
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=1, batch_format="pyarrow"
    )
    dataset.context.target_max_block_size = READ_BLOCK_BYTES
    return dataset


@dataclass
class GroupStream:
    """Training groups as a Ray Dataset, with their validation still running beside it."""

    dataset: ray.data.Dataset
    rows: int  # rows the plan goes by: all non-blank rows, or the valid ones with skip_invalid
    report: DataReport  # validation results that have come in
    pending: list  # ObjectRefs of the per-file reports still being checked
    bytes: int = 0  # the files' size: with `rows`, how big a group is on average

    def finish(self) -> DataReport:
        """Wait for the rest of the validation; the whole report."""
        import ray

        merge_reports(self.report, ray.get(self.pending))
        self.pending = []
        return self.report

    def describe(self) -> str:
        if not self.pending:
            return self.report.summary()
        return (
            f"{self.rows} groups in {len(self.report.files) + len(self.pending)} file(s), "
            "validating beside training"
        )


# Local files up to this size are checked on the driver (~0.1 s per 16 MiB), which costs less
# than the two Ray tasks (two worker processes, on a laptop) that check larger ones.
CHECK_HERE_BYTES = 16 * 2**20


def checked_here(files: Sequence[str]) -> bool:
    """Whether `stream_groups` checks `files` on this process rather than in Ray tasks."""
    return not any(is_uri(f) for f in files) and files_bytes(files) <= CHECK_HERE_BYTES


def files_bytes(files: Sequence[str]) -> int:
    """The total size of `files` (local or URIs), from their metadata."""
    total = 0
    for path in files:
        fs, fs_path = filesystem(path)
        total += fs.get_file_info(fs_path).size or 0
    return total


def stream_groups(paths: str | Sequence[str], skip_invalid: bool = False) -> GroupStream:
    """Count the rows, start validation and open the dataset, without waiting for validation
    (unless `skip_invalid`, whose plan needs the count of valid rows).

    What validation has found by the time the count is done is checked here (a DataError naming
    file:line:field); the rest is for training to watch (`GroupStream.pending`).
    """
    import ray

    files = expand_paths(paths)
    if checked_here(files):
        reports = _raise_data_errors([_file_task(check_file, f) for f in files])
        rows = [r.valid_rows + r.invalid_rows for r in reports]
        dataset = groups_dataset(files, rows)
        stream = GroupStream(dataset, sum(rows), merge_reports(DataReport(), reports), [])
    else:
        counts = start_counts(files)  # first, so that they get the idle Ray workers
        pending = start_validation(files)
        rows = file_rows(counts)
        finished, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        dataset = groups_dataset(files, rows)
        stream = GroupStream(dataset, sum(rows), DataReport(), pending)
        merge_reports(stream.report, ray.get(finished))
    stream.bytes = files_bytes(files)
    if skip_invalid:
        stream.rows = stream.finish().valid_rows
    else:
        raise_for_invalid(stream.report, INVALID_HINT)
    if stream.rows == 0:
        raise DataError(f"no valid groups in {', '.join(files)}")
    return stream


def read_groups(
    paths: str | Sequence[str], skip_invalid: bool = False
) -> tuple[ray.data.Dataset, DataReport]:
    """Validate, then read groups as a Ray Dataset with `GROUP_SCHEMA` (training streams
    instead: `stream_groups`).

    Raises DataError naming file:line:field for the first invalid rows unless `skip_invalid`,
    in which case those rows are dropped and counted in the returned report. The read uses
    the same line decoder and checks as the validation pass, so both agree on every row.
    """
    stream = stream_groups(paths, skip_invalid)
    report = stream.finish()
    if not skip_invalid:
        raise_for_invalid(report, INVALID_HINT)
    return stream.dataset, report


def collect_groups(
    paths: str | Sequence[str], require_neg: bool = True
) -> tuple[list[dict], DataReport]:
    """Read small files into memory on this process; invalid rows are counted, not returned."""
    groups: list[dict] = []
    report = DataReport()
    for path in expand_paths(paths):
        report.merge(check_file(path, require_neg, keep=groups))
    return groups, report


INVALID_HINT = " in training data (use --skip_invalid to skip them)"


def invalid_rows_message(report: DataReport, hint: str = "") -> str | None:
    """The first invalid rows (file:line: field: message), if there are any."""
    if not report.invalid_rows:
        return None
    shown = "\n  ".join(report.errors)
    more = report.invalid_rows - len(report.errors)
    return f"{report.invalid_rows} invalid row(s){hint}:\n  {shown}" + (
        f"\n  ... and {more} more" if more > 0 else ""
    )


def raise_for_invalid(report: DataReport, hint: str = "") -> None:
    """DataError listing the first invalid rows, if there are any."""
    message = invalid_rows_message(report, hint)
    if message:
        raise DataError(message)


def load_groups(paths: str | Sequence[str]) -> list[dict]:
    """Read small files (evaluation sets) into memory on this process, failing on bad rows."""
    groups, report = collect_groups(paths)
    raise_for_invalid(report)
    return groups


# ---------------------------------------------------------------------------- groups


@dataclass
class SampledGroup:
    """One training group: passages[0] is the positive."""

    query: str
    passages: list[str]
    teacher_scores: list[float] | None = None


def sample_group(record: dict, group_size: int, rng: np.random.Generator) -> SampledGroup:
    """1 random positive + `group_size - 1` negatives.

    Negatives are drawn without replacement; a record with fewer than `group_size - 1` repeats
    its list as often as needed first, so each negative comes as often as the others, give or
    take one (FlagEmbedding's sampling; drawing with replacement would let one negative fill
    most of the group).
    """
    pos, neg = list(record["pos"]), list(record["neg"])
    pos_index = int(rng.integers(len(pos)))
    need = group_size - 1
    pool = np.tile(np.arange(len(neg)), math.ceil(need / len(neg)))
    neg_index = rng.choice(pool, size=need, replace=False)
    passages = [pos[pos_index]] + [neg[i] for i in neg_index]
    teacher = None
    if record.get("pos_scores") is not None and record.get("neg_scores") is not None:
        teacher = [float(record["pos_scores"][pos_index])] + [
            float(record["neg_scores"][i]) for i in neg_index
        ]
    return SampledGroup(record["query"], passages, teacher)


def rows_from_batch(batch: dict[str, Any]) -> list[dict]:
    """Turn a columnar numpy batch from Ray Data back into a list of records."""
    n = len(batch["query"])

    def value(column: str, i: int) -> Any:
        v = batch[column][i] if column in batch else None
        return None if v is None else list(v) if column != "query" else str(v)

    return [
        {name: value(name, i) for name in ("query", "pos", "neg", "pos_scores", "neg_scores")}
        for i in range(n)
    ]

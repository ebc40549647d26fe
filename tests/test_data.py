import collections
import gzip
import json

import numpy as np
import pytest

from raykit.data.groups import (
    DataError,
    check_file,
    checked_here,
    count_rows,
    expand_paths,
    interleaved_records,
    read_groups,
    sample_group,
    stream_groups,
)
from tests.helpers import write_jsonl

GOOD = {"query": "what is ray", "pos": ["ray is a framework"], "neg": ["a ray of light"]}


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        ('{"query": "q", "pos": ["p"], "neg": ["n"]', "-", "invalid_json"),
        ('["not", "an", "object"]', "-", "not_an_object"),
        ('{"pos": ["p"], "neg": ["n"]}', "query", "missing_field"),
        ('{"query": "q", "neg": ["n"]}', "pos", "missing_field"),
        ('{"query": 3, "pos": ["p"], "neg": ["n"]}', "query", "wrong_type"),
        ('{"query": "q", "pos": "p", "neg": ["n"]}', "pos", "wrong_type"),
        ('{"query": "q", "pos": ["p"], "neg": [1]}', "neg", "wrong_type"),
        ('{"query": "  ", "pos": ["p"], "neg": ["n"]}', "query", "empty_query"),
        ('{"query": "q", "pos": [], "neg": ["n"]}', "pos", "empty_pos"),
        ('{"query": "q", "pos": ["p"], "neg": []}', "neg", "empty_neg"),
        (
            '{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": []}',
            "neg_scores",
            "scores_length",
        ),
        (
            '{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1]}',
            "neg_scores",
            "missing_field",
        ),
    ],
)
def test_validation_names_file_line_and_field(tmp_path, line, field, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", line, GOOD])
    report = check_file(str(path))
    assert report.valid_rows == 2
    assert report.skipped == {reason: 1}
    assert report.errors[0].startswith(f"{path}:3: {field}: ")


def test_read_groups_fails_before_training_with_location(ray_cluster, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"query": "q", "pos": ["p"], "neg": []}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: neg: neg has no passages"):
        read_groups([str(path)])


def test_skip_invalid_drops_and_counts_per_reason(ray_cluster, tmp_path):
    rows = [
        GOOD,
        "{broken",
        {"query": "", "pos": ["p"], "neg": ["n"]},
        GOOD,
        {"query": "q", "pos": ["p"], "neg": []},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    dataset, report = read_groups([str(path)], skip_invalid=True)
    assert report.valid_rows == 2
    assert report.skipped == {"invalid_json": 1, "empty_query": 1, "empty_neg": 1}
    assert "3 invalid" in report.summary()
    assert [r["query"] for r in dataset.take_all()] == ["what is ray", "what is ray"]


def test_clean_data_reads_with_arrow_schema_and_teacher_scores(ray_cluster, tmp_path):
    scored = {**GOOD, "pos_scores": [2.5], "neg_scores": [-1], "extra": "ignored"}
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, scored])
    dataset, report = read_groups([str(path)])
    assert report.has_teacher_scores
    rows = dataset.take_all()
    assert rows[0]["pos_scores"] is None
    assert list(rows[1]["neg_scores"]) == [-1.0]
    assert "extra" not in rows[1]


def test_directories_and_gzip(ray_cluster, tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "d" / "one.jsonl", [GOOD])
    with gzip.open(tmp_path / "d" / "sub" / "two.jsonl.gz", "wt") as f:
        f.write(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    (tmp_path / "d" / "notes.txt").write_text("not data")
    files = expand_paths([str(tmp_path / "d")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["one.jsonl", "two.jsonl.gz"]
    dataset, report = read_groups([str(tmp_path / "d")])
    assert report.valid_rows == 3 and dataset.count() == 3


def source_files(folder, sizes: dict[str, int]) -> None:
    """One file per source, its queries named after it (`a0`, `a1`, ...), as a folder of
    per-source training files is."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in sizes.items():
        rows = [{"query": f"{name}{i}", "pos": ["p"], "neg": ["n"]} for i in range(n)]
        write_jsonl(folder / f"{name}.jsonl", rows)


def test_files_are_read_side_by_side_each_at_its_share(tmp_path):
    source_files(tmp_path, {"a": 300, "b": 100})
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"query": "bad"}\n')  # counted as a line, never returned
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    queries = [r["query"] for r in interleaved_records(paths, [300, 101])]
    assert sorted(queries) == sorted([f"a{i}" for i in range(300)] + [f"b{i}" for i in range(100)])
    assert queries[:3] == ["a0", "a1", "a2"]  # each file in its own order
    # Every quarter of the stream holds about a quarter of b (in turns of 16 lines), where a
    # file-after-file read has none of b in its first three quarters.
    for quarter in range(4):
        part = queries[quarter * 100 : (quarter + 1) * 100]
        assert 15 <= sum(q.startswith("b") for q in part) <= 35, (quarter, part)


def test_a_folder_of_sources_trains_on_a_mix_of_them_from_the_first_step(ray_cluster, tmp_path):
    source_files(tmp_path / "data", {"msmarco": 200, "nq": 200, "hotpot": 200})
    stream = stream_groups(str(tmp_path / "data"))
    assert stream.rows == 600
    first = [row["query"] for row in stream.dataset.take(48)]
    assert {q.rstrip("0123456789") for q in first} == {"msmarco", "nq", "hotpot"}


def test_directories_skip_names_starting_with_underscore_or_dot(tmp_path, caplog):
    """A scoring output folder (its `_errors/`, in-progress files) reads as training data."""
    (tmp_path / "out" / "_errors").mkdir(parents=True)
    (tmp_path / "out" / ".cache" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "out" / "train.jsonl", [GOOD])
    write_jsonl(tmp_path / "out" / "_errors" / "train.jsonl.jsonl", [{"line": 3}])
    write_jsonl(tmp_path / "out" / ".cache" / "sub" / "x.jsonl", [GOOD])
    write_jsonl(tmp_path / "out" / "_SUCCESS.jsonl", [GOOD])
    write_jsonl(tmp_path / "out" / ".train.jsonl.inprogress.jsonl", [GOOD])
    with caplog.at_level("INFO", logger="raykit"):
        files = expand_paths(str(tmp_path / "out"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["train.jsonl"]
    assert 'skipped 4 file(s) under names starting with "_" or "."' in caplog.text
    # A file named explicitly is read whatever its name.
    assert expand_paths(str(tmp_path / "out" / "_SUCCESS.jsonl"))[0].endswith("_SUCCESS.jsonl")


def test_parquet_groups_are_checked_row_by_row(tmp_path):
    """Training groups in Parquet (what `raykit score` writes by default) read like JSONL; a bad
    row is named by its row number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scored = {**GOOD, "pos_scores": [1.0], "neg_scores": [0.5]}
    rows = [scored, {**GOOD, "pos": []}, GOOD]  # GOOD's scores are nulls in Parquet
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "groups.parquet")
    report = check_file(str(tmp_path / "groups.parquet"))
    assert report.valid_rows == 2 and report.has_teacher_scores
    assert report.errors == [f"{tmp_path}/groups.parquet:2: pos: pos has no passages"]
    unscored = {**GOOD, "pos_scores": None, "neg_scores": None}  # null columns: no teacher
    pq.write_table(pa.Table.from_pylist([unscored]), tmp_path / "groups.parquet")
    assert not check_file(str(tmp_path / "groups.parquet")).has_teacher_scores
    assert expand_paths(str(tmp_path)) == [f"{tmp_path}/groups.parquet"]


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        expand_paths([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no"):
        expand_paths([str(tmp_path / "empty")])


def test_sample_group_puts_positive_first_and_aligns_teacher_scores():
    record = {
        "query": "q",
        "pos": ["p0", "p1"],
        "neg": [f"n{i}" for i in range(10)],
        "pos_scores": [10.0, 11.0],
        "neg_scores": [float(i) for i in range(10)],
    }
    group = sample_group(record, 5, np.random.default_rng(0))
    assert group.passages[0] in ("p0", "p1")
    assert len(group.passages) == 5 and len(set(group.passages[1:])) == 4  # no repeats
    assert group.teacher_scores[0] == 10.0 + int(group.passages[0][1])
    assert group.teacher_scores[1:] == [float(p[1:]) for p in group.passages[1:]]


def test_sample_group_repeats_too_few_negatives_evenly():
    """7 negatives from 2 (or 3): each comes 3 or 4 times (2 or 3), as FlagEmbedding samples,
    in every draw; drawing with replacement gives 5-2, 6-1 or 7-0 splits in most seeds."""
    record = {"query": "q", "pos": ["p"], "neg": ["n0", "n1"]}
    for seed in range(50):
        group = sample_group(record, 8, np.random.default_rng(seed))
        assert len(group.passages) == 8 and group.teacher_scores is None
        counts = collections.Counter(group.passages[1:])
        assert set(counts) == {"n0", "n1"} and sorted(counts.values()) == [3, 4], counts
    record["neg"] = ["n0", "n1", "n2"]
    for seed in range(50):
        counts = collections.Counter(
            sample_group(record, 8, np.random.default_rng(seed)).passages[1:]
        )
        assert sorted(counts.values()) in ([2, 2, 3], [1, 3, 3]), counts


def test_sampling_is_seeded():
    record = {"query": "q", "pos": ["a", "b", "c"], "neg": [str(i) for i in range(20)]}
    draw = [sample_group(record, 6, np.random.default_rng(42)).passages for _ in range(2)]
    assert draw[0] == draw[1]


def test_text_that_is_not_unicode_is_a_bad_row_with_its_line(tmp_path):
    """A lone surrogate escape is valid JSON but no tokenizer or Arrow column takes it; bytes
    that are not UTF-8 spoil one line, not the file. A BOM and CRLF line ends are fine."""
    lines = [
        json.dumps(GOOD).encode(),
        b'{"query": "q", "pos": ["ok", "\\ud800"], "neg": ["n"]}',
        b'{"query": "caf\xe9", "pos": ["p"], "neg": ["n"]}',  # Latin-1, not UTF-8
        b'{"query": "\\udfff q", "pos": ["p"], "neg": ["n"]}',
        json.dumps(GOOD).encode(),
    ]
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    report = check_file(str(path))
    assert report.valid_rows == 2
    assert report.errors == [
        f"{path}:2: pos[1]: not valid Unicode (a lone surrogate escape)",
        f"{path}:3: -: not valid UTF-8 (byte 0xe9 at column 15)",
        f"{path}:4: query: not valid Unicode (a lone surrogate escape)",
    ]
    assert report.skipped == {"invalid_text": 2, "invalid_utf8": 1}


def test_reading_agrees_with_validation_on_every_row(ray_cluster, tmp_path):
    rows = [
        GOOD,
        '{"query": "q", "pos": ["\\ud800"], "neg": ["n"]}',
        {**GOOD, "query": "second"},
        '{"query": "q", "pos": ["p"], "neg": ["n"]} trailing',
        {**GOOD, "query": "third"},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=r"rows\.jsonl:2: pos\[0\]: not valid Unicode"):
        read_groups([str(path)])
    dataset, report = read_groups([str(path)], skip_invalid=True)
    assert [r["query"] for r in dataset.take_all()] == ["what is ray", "second", "third"]
    assert report.valid_rows == 3 and report.invalid_rows == 2


def test_truncated_gzip_is_one_line_with_the_line_reached(ray_cluster, tmp_path):
    import os

    rows = [{**GOOD, "query": os.urandom(16).hex()} for _ in range(40_000)]
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as caught:
        read_groups([str(path)])
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read after line ") and "runcated" in message
    assert len(message.splitlines()) == 1


def test_counting_rows_agrees_with_validation_without_parsing(tmp_path):
    """The count the step plan goes by is validation's row count: blank and whitespace-only
    lines, a BOM, CRLF ends, a missing last newline, gzip and Parquet included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    line = json.dumps(GOOD)
    text = "\ufeff" + line + "\r\n\n   \n" + line + "\n{broken\n\t\r\n" + line
    plain = tmp_path / "mixed.jsonl"
    plain.write_bytes(text.encode())
    packed = tmp_path / "mixed.jsonl.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD] * 5), table)
    for path in (plain, packed, table):
        report = check_file(str(path))
        assert count_rows(str(path)) == report.valid_rows + report.invalid_rows
    assert count_rows(str(plain)) == 4


def test_a_bad_row_deep_in_a_large_file_is_named_by_file_and_line(tmp_path):
    rows = 900_000
    path = tmp_path / "large.jsonl"
    with open(path, "w") as f:
        f.writelines(f'{{"query": "q{i}", "pos": ["p"], "neg": ["n"]}}\n' for i in range(rows - 1))
        f.write('{"query": "q", "pos": ["p"], "neg": "n"}\n')
    assert count_rows(str(path)) == rows
    report = check_file(str(path))
    assert report.valid_rows == rows - 1
    assert report.errors == [f"{path}:{rows}: neg: expected a list of strings"]


def test_small_local_training_data_is_checked_on_the_driver(ray_cluster, tmp_path):
    """Small local files are checked whole before training (no Ray tasks): a bad row is one
    line naming file:line, and with skip_invalid the plan counts only the valid rows."""
    path = tmp_path / "small.jsonl"
    good = '{"query": "q", "pos": ["p"], "neg": ["n"]}\n'
    path.write_text(good * 3 + "\n" + '{"query": "q", "pos": ["p"], "neg": "n"}\n')
    with pytest.raises(DataError, match=rf"{path}:5: neg: expected a list of strings"):
        stream_groups([str(path)])
    stream = stream_groups([str(path)], skip_invalid=True)
    assert stream.rows == 3 and not stream.pending and stream.report.invalid_rows == 1
    assert "validating beside training" not in stream.describe()
    assert len(stream.dataset.take_all()) == 3


def test_training_data_is_counted_before_its_validation_ends(ray_cluster, tmp_path):
    """`stream_groups` returns once the rows are counted; validation of a large file is still
    running and `finish` gives its whole report."""
    rows = 400_000
    path = tmp_path / "large.jsonl"
    with open(path, "w") as f:
        f.writelines(f'{{"query": "q{i}", "pos": ["p"], "neg": ["n"]}}\n' for i in range(rows))
    assert not checked_here([str(path)])
    stream = stream_groups([str(path)])
    assert stream.rows == rows
    assert len(stream.pending) == 1 and "validating beside training" in stream.describe()
    assert stream.finish().valid_rows == rows and not stream.pending
    assert stream.dataset.take(1)[0]["query"] == "q0"

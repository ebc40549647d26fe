"""`raykit score` on the tiny model: input shapes, exact scores, errors, resume, actor faults."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raykit.cli import app, normalize_argv
from raykit.config import ConfigError, ScoreConfig
from raykit.core.reranker import Reranker
from raykit.runtime.console import ACTOR_ARGS_NOTICE
from raykit.scoring.outputs import output_names, rank_within_queries
from raykit.scoring.pipeline import run_score
from tests.helpers import (
    SAMPLE_DEV,
    SAMPLE_TRAIN,
    actor_pids,
    build_tiny_reranker,
    raykit_lines,
    run_cli,
    tiny_args,
    write_jsonl,
)


def dev_groups(source: Path = SAMPLE_DEV) -> list[dict]:
    return [json.loads(line) for line in source.read_text().splitlines()]


def pair_rows(groups: list[dict]) -> list[dict]:
    return [
        {"query_id": f"q{q}", "doc_id": f"q{q}-d{d}", "query": g["query"], "passage": p}
        for q, g in enumerate(groups)
        for d, p in enumerate(g["pos"] + g["neg"])
    ]


def score_config(model: str | list[str], inputs: list[Path], output: Path, **extra) -> ScoreConfig:
    values = {"max_len": 64, "batch_size": 16, "sort_window": 64, "num_actors": 1, **extra}
    return ScoreConfig(model=model, input=[str(p) for p in inputs], output=str(output), **values)


def other_weights(model: str, out: Path) -> str:
    """`model` with its tokenizer and other weights: a second teacher of the same base."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(model, out)
    torch.manual_seed(1)
    copy = AutoModelForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    copy.save_pretrained(out)
    return str(out)


def read_output(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return pq.read_table(path).to_pylist()


def test_pairs_groups_and_parquet_inputs_score_like_reranker(
    ray_cluster, tiny_model_dir, tmp_path, capfd
):
    groups = dev_groups()
    pairs = pair_rows(groups)
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "pairs.jsonl", pairs)
    group_rows = [
        {"qid": i, "query": g["query"], "candidates": g["pos"] + g["neg"]}
        for i, g in enumerate(groups)
    ]
    write_jsonl(tmp_path / "in" / "groups.jsonl", group_rows)
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "in" / "ids.parquet")

    # Compiled: one actor builds the package (the other waits for it and restores it), and
    # the scores still equal the eager Reranker's.
    cfg = score_config(
        tiny_model_dir,
        [tmp_path / "in"],
        tmp_path / "out",
        group_by=None,
        normalize=True,
        num_actors=2,
        compile="on",
        compile_cache=str(tmp_path / "compiled"),
    )
    summary = run_score(cfg)
    # Not Ray's notice about actor arguments (ray-project/ray#57733), once per scoring actor.
    assert ACTOR_ARGS_NOTICE.decode() not in capfd.readouterr().err
    assert len(list((tmp_path / "compiled").glob("*.pt2"))) == 1

    reranker = Reranker(tiny_model_dir, device="cpu", max_length=64)
    expected = reranker.compute_score([[p["query"], p["passage"]] for p in pairs])
    for name in ("pairs", "ids"):
        rows = read_output(tmp_path / "out" / f"{name}.parquet")
        assert [r["doc_id"] for r in rows] == [p["doc_id"] for p in pairs]  # all, once, in order
        assert set(rows[0]) == {
            "query_id",
            "doc_id",
            "query",
            "passage",
            "score",
            "normalized_score",
        }
        for row, score in zip(rows, expected, strict=True):
            assert row["score"] == pytest.approx(score, abs=1e-4)
            assert row["normalized_score"] == pytest.approx(1 / (1 + pow(2.718281828, -score)))
    rows = read_output(tmp_path / "out" / "groups.parquet")
    assert len(rows) == len(pairs)
    by_pair = {(p["query"], p["passage"]): s for p, s in zip(pairs, expected, strict=True)}
    for qid, group in enumerate(group_rows):
        mine = [r for r in rows if r["qid"] == qid]
        assert sorted(r["candidate_index"] for r in mine) == list(range(len(group["candidates"])))
        ranked = sorted(mine, key=lambda r: r["rank"])
        assert [r["rank"] for r in ranked] == list(range(1, len(mine) + 1))
        assert all(a["score"] >= b["score"] for a, b in zip(ranked, ranked[1:], strict=False))
        for r in mine:
            assert r["passage"] == group["candidates"][r["candidate_index"]]
            assert r["score"] == pytest.approx(by_pair[(r["query"], r["passage"])], abs=1e-4)
    assert summary["rows_in"] == 2 * len(pairs) + len(group_rows)
    assert summary["pairs_scored"] == 3 * len(pairs) and summary["rows_rejected"] == 0


def test_group_by_top_k_and_jsonl_round_trip(ray_cluster, tiny_model_dir, tmp_path):
    pairs = pair_rows(dev_groups())
    source = write_jsonl(tmp_path / "run.jsonl", pairs)
    cfg = score_config(
        tiny_model_dir, [source], tmp_path / "out", format="jsonl", group_by="query_id", top_k=2
    )
    summary = run_score(cfg)
    rows = read_output(tmp_path / "out" / "run.jsonl")
    assert summary["rows_out"] == len(rows) == 2 * len({p["query_id"] for p in pairs})
    assert {r["rank"] for r in rows} == {1, 2}
    full = {(p["doc_id"]): p for p in pairs}
    for row in rows:  # every input column survives the JSONL round trip unchanged
        assert {k: row[k] for k in full[row["doc_id"]]} == full[row["doc_id"]]
    for qid in {p["query_id"] for p in pairs}:
        mine = sorted((r for r in rows if r["query_id"] == qid), key=lambda r: r["rank"])
        assert mine[0]["score"] >= mine[1]["score"]


def test_mixed_rows_keep_every_column_and_only_keyed_rows_are_ranked(
    ray_cluster, tiny_model_dir, tmp_path, capsys
):
    group = dev_groups()[0]
    candidates = group["pos"] + group["neg"]
    source = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"query": group["query"], "passage": candidates[0]},  # no doc_id: not lost for row 2
            {"query": group["query"], "passage": candidates[1], "doc_id": "d1"},
            {"query": group["query"], "candidates": candidates, "qid": 7},
        ],
    )
    cfg = score_config(tiny_model_dir, [source], tmp_path / "out", format="jsonl", top_k=1)
    summary = run_score(cfg)
    rows = read_output(tmp_path / "out" / "mixed.jsonl")
    assert "top_k does not apply to 2 pair row(s)" in capsys.readouterr().out
    assert [(r["passage"], r["doc_id"], r["rank"]) for r in rows[:2]] == [
        (candidates[0], None, None),
        (candidates[1], "d1", None),
    ]
    scores = Reranker(tiny_model_dir, device="cpu", max_length=64).compute_score(
        [[group["query"], c] for c in candidates]
    )
    best = int(np.argmax(scores))
    assert (
        len(rows) == 3
        and summary["rows_out"] == 3
        and summary["pairs_scored"] == 2 + len(candidates)
    )
    assert (rows[2]["qid"], rows[2]["candidate_index"], rows[2]["rank"]) == (7, best, 1)
    assert rows[2]["score"] == pytest.approx(scores[best], abs=1e-4)


def test_bad_rows_go_to_errors_file_and_fail_the_run(ray_cluster, tiny_model_dir, tmp_path):
    good = pair_rows(dev_groups())[:5]
    source = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            good[0],
            "{not json",
            {"query": "q", "passage": ""},
            {"query": "q"},
            {"query": 3, "passage": "p"},
            good[1],
            {"query": "q", "candidates": ["a", 7]},
        ],
    )
    errors = tmp_path / "errors.jsonl"
    args = [
        "score",
        "--model",
        tiny_model_dir,
        "--input",
        str(source),
        "--output",
        str(tmp_path / "out"),
        "--errors_path",
        str(errors),
        "--max_len",
        "64",
    ]
    result = CliRunner().invoke(app, normalize_argv(args))
    assert result.exit_code == 1
    assert "5 of 7 rows rejected" in result.output and "Traceback" not in result.output
    records = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in records] == [
        (2, "invalid JSON: Expecting property name enclosed in double quotes"),
        (3, "field 'passage' is empty"),
        (4, "missing field 'passage' (or 'candidates')"),
        (5, "field 'query' is not a string"),
        (7, "field 'candidates[1]' is not a string"),
    ]
    assert records[1]["row"] == {"query": "q", "passage": ""} and records[0]["file"] == str(source)
    assert [r["doc_id"] for r in read_output(tmp_path / "out" / "mixed.parquet")] == [
        good[0]["doc_id"],
        good[1]["doc_id"],
    ]
    # A missing model or file is one line, not a traceback. (A tolerated error rate passes:
    # the next test.)
    for bad_args, message in (
        (["--model", str(tmp_path / "nope")], "is neither a local folder nor a model"),
        (["--input", str(tmp_path / "missing.jsonl")], "no such file or directory"),
    ):
        result = CliRunner().invoke(app, normalize_argv(args + ["--overwrite", *bad_args]))
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_undecodable_rows_go_to_the_errors_file_and_the_rest_is_scored(
    ray_cluster, tiny_model_dir, tmp_path
):
    """A lone surrogate escape, bytes that are not UTF-8, a BOM and CRLF line ends: bad rows
    are rejected one by one and, under `--max_error_rate`, the run goes on and scores the good
    rows (above it, the run fails: the test before)."""
    good = pair_rows(dev_groups())[:4]
    lines = [
        json.dumps(good[0]).encode(),
        b'{"query": "q", "passage": "\\ud800 broken"}',  # valid JSON, not valid Unicode
        json.dumps(good[1]).encode(),
        b'{"query": "q", "passage": "caf\xff\xfe"}',  # not UTF-8
        json.dumps({**good[2], "doc_id": "\udfff"}, ensure_ascii=True).encode(),  # carried column
        json.dumps(good[3]).encode(),
    ]
    source = tmp_path / "dirty.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # BOM, CRLF
    out, errors = tmp_path / "out", tmp_path / "errors.jsonl"
    args = [
        "score",
        "--model",
        tiny_model_dir,
        "--input",
        str(source),
        "--output",
        str(out),
        "--errors_path",
        str(errors),
        "--max_len",
        "64",
        "--max_error_rate",
        "0.5",
    ]
    result = CliRunner().invoke(app, normalize_argv(args))
    assert result.exit_code == 0, result.output
    rows = read_output(out / "dirty.parquet")
    assert [r["doc_id"] for r in rows] == [good[0]["doc_id"], good[1]["doc_id"], good[3]["doc_id"]]
    records = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in records] == [
        (2, "field 'passage' is not valid Unicode (a lone surrogate escape)"),
        (4, "not valid UTF-8 (byte 0xff at column 31)"),
        (5, "field 'doc_id' is not valid Unicode (a lone surrogate escape)"),
    ]
    assert records[1]["row"] == '{"query": "q", "passage": "caf\\xff\\xfe"}'
    assert '"rows_in": 6, "rows_out": 3, "rows_rejected": 3' in result.output, result.output


def test_truncated_gzip_and_unwritable_output_are_one_line_errors(
    ray_cluster, tiny_model_dir, tmp_path
):
    import gzip

    rows = [{"query": f"q {i}", "passage": os.urandom(24).hex()} for i in range(40_000)]
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    args = [
        "score",
        "--model",
        tiny_model_dir,
        "--input",
        str(tmp_path / "cut.jsonl.gz"),
        "--output",
        str(tmp_path / "out"),
        "--max_len",
        "64",
    ]
    (tmp_path / "file").write_text("not a folder")
    result = CliRunner().invoke(
        app, normalize_argv(args[:-4] + ["--output", str(tmp_path / "file" / "o")])
    )
    assert result.exit_code == 1
    assert "output: cannot create" in result.output and "is a file" in result.output
    assert len(raykit_lines(result.output)) == 1
    result = CliRunner().invoke(app, normalize_argv(args))
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error and "cut.jsonl.gz: cannot read after line" in error[0], result.output
    assert "Traceback" not in result.output


def test_resume_skips_finished_files_without_duplicates(ray_cluster, tiny_model_dir, tmp_path):
    pairs = pair_rows(dev_groups())
    (tmp_path / "in").mkdir()
    first = write_jsonl(tmp_path / "in" / "a.jsonl", pairs)
    write_jsonl(tmp_path / "in" / "b.jsonl", pair_rows(dev_groups(SAMPLE_TRAIN)))
    out = tmp_path / "out"
    cfg = score_config(tiny_model_dir, [tmp_path / "in"], out)
    run_score(cfg)
    finished = out / "a.parquet"
    stamp = finished.stat().st_mtime_ns
    # Simulate an interruption while b was being written: its output is only in progress.
    (out / "b.parquet").rename(out / ".b.parquet.inprogress")
    with pytest.raises(ConfigError, match="use --resume"):
        run_score(score_config(tiny_model_dir, [first], out))
    summary = run_score(score_config(tiny_model_dir, [tmp_path / "in"], out, resume=True))
    assert summary["files_skipped"] == 1 and finished.stat().st_mtime_ns == stamp
    rows = read_output(out / "b.parquet")
    assert len(rows) == len({r["doc_id"] for r in rows}) == summary["rows_in"]
    assert not (out / ".b.parquet.inprogress").exists()


@pytest.mark.slow
@pytest.mark.fault
def test_killed_scoring_actor_loses_and_duplicates_nothing(ray_cluster, tiny_model_dir, tmp_path):
    # 3,600 pairs scored one at a time: the run outlasts the first delivered window by far.
    pairs = [{**row, "doc_id": i} for i, row in enumerate(pair_rows(dev_groups()) * 60)]
    source = write_jsonl(tmp_path / "big.jsonl", pairs)
    out = tmp_path / "out"
    cfg = score_config(tiny_model_dir, [source], out, num_actors=2, batch_size=1, sort_window=16)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run_score(cfg)))
    worker.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and worker.is_alive() and time.time() < deadline:
        # The scoring stage is the pipeline's only actor pool: its actors are Ray Data's
        # map workers, found in Ray's actor table.
        victims = actor_pids("MapWorker") if (out / ".big.parquet.inprogress").exists() else []
        if victims:
            killed = victims[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    worker.join(timeout=600)
    assert killed is not None, "the run ended before an actor could be killed"
    rows = read_output(out / "big.parquet")
    assert sorted(r["doc_id"] for r in rows) == list(range(len(pairs)))
    assert result["rows_in"] == result["rows_out"] == len(pairs)


@pytest.mark.slow
def test_training_groups_get_teacher_scores_that_finetune_distils_from(
    ray_cluster, tiny_model_dir, tmp_path
):
    """`raykit score` on training groups writes them back with a teacher ensemble's raw
    scores (the mean of two models'), in pos/neg order; the output folder, `_errors/` and all,
    is `finetune --train_data` as it is, and the KL term is on (its loss is reported)."""
    second = other_weights(tiny_model_dir, tmp_path / "second")
    groups = [json.loads(line) for line in SAMPLE_TRAIN.read_text().splitlines()][:8]
    groups[1] = {**groups[1], "pos_scores": [9.0], "neg_scores": [0.0] * len(groups[1]["neg"])}
    bad = {"query": "q", "pos": ["p", ""], "neg": ["n"]}
    source = write_jsonl(tmp_path / "train.jsonl", [*groups[:4], bad, *groups[4:]])
    teachers = [tiny_model_dir, second]
    cfg = score_config(teachers, [source], tmp_path / "teacher", format="jsonl", max_error_rate=0.2)
    summary = run_score(cfg)

    rows = read_output(tmp_path / "teacher" / "train.jsonl")
    assert summary["rows_out"] == len(rows) == 8 and summary["rows_rejected"] == 1
    rerankers = [Reranker(m, device="cpu", max_length=64) for m in teachers]
    for group, row in zip(groups, rows, strict=True):
        assert {k: row[k] for k in ("query", "pos", "neg")} == {
            k: group[k] for k in ("query", "pos", "neg")
        }
        pairs = [[group["query"], p] for p in group["pos"] + group["neg"]]
        each = [reranker.compute_score(pairs) for reranker in rerankers]
        assert np.abs(np.subtract(*each)).max() > 0.01  # two different teachers
        expected = np.mean(each, axis=0)
        positives = len(group["pos"])
        np.testing.assert_allclose(row["pos_scores"], expected[:positives], atol=1e-5)
        np.testing.assert_allclose(row["neg_scores"], expected[positives:], atol=1e-5)
    errors = [json.loads(line) for line in (tmp_path / "teacher" / "_errors.jsonl").open()]
    assert [(e["line"], e["reason"]) for e in errors] == [(5, "field 'pos[1]' is empty")]

    args = tiny_args(
        tiny_model_dir,
        tmp_path,
        train_data=str(tmp_path / "teacher"),
        max_steps="2",
        per_device_train_batch_size="2",
        distill_weight="1.0",
    )
    output = run_cli(args).output
    assert "8 valid groups in 1 file(s) with teacher scores" in output
    trained = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert all(entry["distill_loss"] > 0 for entry in trained["loss"])


def test_an_ensemble_of_models_with_different_tokenizers_is_refused_before_ray_starts(
    tiny_model_dir, tmp_path
):
    other = build_tiny_reranker(tmp_path / "other", texts=["other words entirely"] * 50)
    source = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(dev_groups()[:2]))
    cfg = score_config([tiny_model_dir, other], [source], tmp_path / "out")
    with pytest.raises(ConfigError, match=f"model: {other} does not share"):
        run_score(cfg)
    assert not (tmp_path / "out" / "pairs.parquet").exists()


def test_output_names_and_config_errors():
    assert output_names(["/a/x.jsonl.gz", "/b/y.parquet"], ".parquet") == ["x.parquet", "y.parquet"]
    assert output_names(["/r/a/x.jsonl", "/r/b/x.jsonl"], ".jsonl") == ["a/x.jsonl", "b/x.jsonl"]
    with pytest.raises(ConfigError, match="format"):
        ScoreConfig(input=["x"], format="csv")
    with pytest.raises(ConfigError, match="min_actors"):
        ScoreConfig(input=["x"], min_actors=3, max_actors=2)
    assert ScoreConfig(input=["x"], min_actors=1, max_actors=4).actor_pool_size == (1, 4)
    assert ScoreConfig(input=["x"], num_actors=3).actor_pool_size == (3, 3)


def test_rank_within_queries_orders_by_score_keeps_ties_in_input_order():
    query = np.array([0, 0, 1, -1, 0, 1, 1, 2], dtype=np.int32)
    score = np.array([0.1, 0.5, 0.3, 0.9, 0.5, 0.2, 0.4, -3.0], dtype=np.float32)
    # query 0: rows 1 and 4 tie at 0.5 (row 1 first); row 3 has no query and no rank
    assert rank_within_queries(query, score).tolist() == [3, 1, 2, 0, 2, 3, 1, 1]
    empty = rank_within_queries(np.array([], np.int32), np.array([], np.float32))
    assert empty.tolist() == []

"""`raykit mine`: BM25 and dense candidates, exclusions, shortfalls, the false-negative filter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from raykit.cli import app, normalize_argv
from raykit.config import ConfigError, MineConfig
from raykit.core.reranker import Reranker
from raykit.data.groups import check_file
from raykit.mining.dense import TextEmbedder, retrieve_dense
from raykit.mining.mine import run_mine
from tests.helpers import ROOT, train_tiny, write_jsonl

PERMIT_POS = "Renew your residence permit at the immigration department with your passport."
BEACH_POS = "Sealine beach is the best beach for kids near Doha."
PERMIT_HARD = [
    "The residence permit in Qatar cannot be renewed online.",
    "Qatar residence permit fees went up this year.",
]
BEACH_HARD = ["Doha beach hotels are expensive for kids.", "The best beach is crowded on Fridays."]
UNRELATED = ["The pizza at Mario's is great.", "Football match tonight at the stadium."]
GROUPS = [
    {
        "query": "how to renew qatar residence permit",
        "pos": [PERMIT_POS],
        "neg": ["I like cats."],
    },
    {"query": "best beach near doha for kids", "pos": [BEACH_POS], "id": 7},
]


def corpus_file(tmp_path: Path, extra: list[str] = ()) -> Path:
    texts = [PERMIT_POS, BEACH_POS, *PERMIT_HARD, *BEACH_HARD, *UNRELATED, GROUPS[0]["query"]]
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate([*texts, *extra])]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


def mine(tmp_path: Path, **overrides) -> tuple[list[dict], dict]:
    values = {
        "input": [str(write_jsonl(tmp_path / "in.jsonl", GROUPS))],
        "corpus": [str(corpus_file(tmp_path))],
        "output": str(tmp_path / "out.jsonl"),
        "range": "0-10",
        "negatives": 2,
        **overrides,
    }
    summary = run_mine(MineConfig(**values))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    return rows, summary


def test_bm25_mines_the_lexically_close_negatives(tmp_path):
    rows, summary = mine(tmp_path)
    permit, beach = rows
    # Existing negatives are kept; the query text and the positive are never negatives.
    assert permit["neg"][0] == "I like cats."
    assert sorted(permit["neg"][1:]) == sorted(PERMIT_HARD)
    assert sorted(beach["neg"]) == sorted(BEACH_HARD)
    assert beach["id"] == 7 and beach["pos"] == [BEACH_POS]
    assert summary["negatives_mined"] == 4 and summary["short_queries"] == 0
    assert summary["groups_out"] == 2 and summary["corpus_texts"] == 9


def test_replace_range_and_shortfalls_are_reported(tmp_path, capsys):
    rows, summary = mine(tmp_path, replace_neg=True, negatives=3)
    assert "I like cats." not in rows[0]["neg"]
    assert sorted(rows[0]["neg"]) == sorted(PERMIT_HARD)  # only 2 found, nothing invented
    assert summary["short_queries"] == 2 and summary["padded_random"] == 0
    assert "2 of 2 queries had fewer than 3 candidates" in capsys.readouterr().out

    rows, summary = mine(tmp_path, replace_neg=True, negatives=3, pad_random=True)
    for row in rows:
        assert len(set(row["neg"])) == 3
        assert not set(row["neg"]) & {*row["pos"], row["query"]}
    assert summary["padded_random"] == 2

    # Rank 0 of each query is its positive; from rank 2 on only one hard negative is left.
    rows, _ = mine(tmp_path, replace_neg=True, range="2-10")
    assert len(rows[0]["neg"]) == 1 and rows[0]["neg"][0] in PERMIT_HARD


def test_default_corpus_pools_the_input_texts_and_drops_teacher_scores(tmp_path):
    groups = [
        dict(GROUPS[0], pos_scores=[0.9], neg_scores=[0.1]),
        GROUPS[1],
        {"query": "qatar beach permit", "pos": ["unrelated answer text"]},
    ]
    write_jsonl(tmp_path / "in.jsonl", groups)
    summary = run_mine(
        MineConfig(
            input=[str(tmp_path / "in.jsonl")],
            range="0-10",
            output=str(tmp_path / "out.jsonl"),
            negatives=5,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary["corpus_texts"] == 4  # 3 positives + 1 negative, each once
    assert summary["teacher_scores_removed"] == 1 and "pos_scores" not in rows[0]
    for row in rows:
        assert not set(row["pos"]) & set(row["neg"])
    by_query = {row["query"]: row for row in rows}
    assert set(by_query["qatar beach permit"]["neg"]) == {PERMIT_POS, BEACH_POS}  # others' pos
    # The beach query finds only its own positive: not trainable, counted, left out.
    assert GROUPS[1]["query"] not in by_query and summary["groups_without_negatives"] == 1


def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path):
    lines = [json.dumps(GROUPS[0]), json.dumps({"query": "no positives", "neg": ["x"]}), "{oops"]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    args = ["mine", "--input", str(path), "--output", str(tmp_path / "o.jsonl")]
    result = CliRunner().invoke(app, normalize_argv(args))
    assert result.exit_code == 1
    assert f"{path}:2: pos: required field is missing" in result.output
    assert f"{path}:3: -: invalid JSON" in result.output
    assert "Traceback" not in result.output

    result = CliRunner().invoke(app, normalize_argv([*args, "--skip_invalid", "--range", "0-5"]))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.split("mine summary: ")[1].splitlines()[0])
    assert summary["rows_skipped"] == 2
    assert summary["skipped_reasons"] == {"missing_field": 1, "invalid_json": 1}

    bad_corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "ok"}, {"id": 3}])
    result = CliRunner().invoke(
        app, normalize_argv([*args, "--skip_invalid", "--corpus", str(bad_corpus)])
    )
    assert result.exit_code == 1 and f"{bad_corpus}:2: text" in result.output


@pytest.mark.parametrize("value", ["10", "5-5", "a-b", "-1-4"])
def test_bad_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="range"):
        MineConfig(input=["x"], range=value)


def test_filter_drops_a_planted_false_negative(ray_cluster, tiny_model_dir, tmp_path):
    # A filter model trained to put each positive above the other texts. The planted text
    # tokenises exactly like the permit positive (the tokenizer lowercases), so it scores exactly
    # like it: a duplicate answer that the corpus would hand out as a negative.
    others = [*PERMIT_HARD, *BEACH_HARD, *UNRELATED]
    groups = [[g["query"], g["pos"][0], *others] for g in GROUPS]
    filter_model = train_tiny(tiny_model_dir, groups, tmp_path / "filter", steps=40)
    planted = PERMIT_POS.upper()
    write_jsonl(tmp_path / "in.jsonl", GROUPS)
    cfg = MineConfig(
        input=[str(tmp_path / "in.jsonl")],
        output=str(tmp_path / "out.jsonl"),
        corpus=[str(corpus_file(tmp_path, [planted]))],
        range="0-10",
        negatives=50,
        replace_neg=True,
        filter_model=filter_model,
        filter_margin=0.95,
        num_actors=2,
    )
    summary = run_mine(cfg)
    rows = {r["query"]: r for r in map(json.loads, (tmp_path / "out.jsonl").open())}

    # Without the filter the planted text is a candidate; with it, exactly the candidates that
    # score at most margin x sigmoid(positive) remain.
    (tmp_path / "plain").mkdir()
    unfiltered, _ = mine(tmp_path / "plain", corpus=cfg.corpus, negatives=50, replace_neg=True)
    assert planted in unfiltered[0]["neg"]
    reranker = Reranker(filter_model, device="cpu")
    dropped = 0
    for row in unfiltered:
        pos = reranker.compute_score([[row["query"], row["pos"][0]]], normalize=True)[0]
        scores = reranker.compute_score([[row["query"], n] for n in row["neg"]], normalize=True)
        expected = {n for n, s in zip(row["neg"], scores, strict=True) if s <= 0.95 * pos}
        dropped += len(row["neg"]) - len(expected)
        assert set(rows[row["query"]]["neg"]) == expected
    assert planted not in rows[GROUPS[0]["query"]]["neg"]
    assert set(PERMIT_HARD) <= set(rows[GROUPS[0]["query"]]["neg"])  # true negatives survive
    assert summary["filtered_out"] == dropped


def test_dense_retrieval_matches_brute_force_and_excludes_positives(
    ray_cluster, tiny_model_dir, tmp_path
):
    cfg = MineConfig(
        input=["unused"],
        retriever="dense",
        embedder=tiny_model_dir,
        max_len=64,
        num_actors=2,
        query_instruction="query: ",
    )
    corpus = [PERMIT_POS, BEACH_POS, *PERMIT_HARD, *BEACH_HARD, *UNRELATED]
    queries = [g["query"] for g in GROUPS]
    hits = retrieve_dense(queries, corpus, 5, cfg)

    embed = TextEmbedder(cfg)
    texts = ["query: " + q for q in queries] + corpus
    vectors = embed({"row": np.arange(len(texts)), "text": np.array(texts, dtype=object)})
    vectors = vectors["embedding"]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors[: len(queries)] @ vectors[len(queries) :].T
    assert hits == [list(np.argsort(-row, kind="stable")[:5]) for row in sims]

    rows, summary = mine(
        tmp_path,
        retriever="dense",
        embedder=tiny_model_dir,
        max_len=64,
        negatives=3,
        replace_neg=True,
    )
    assert summary["negatives_mined"] == 6
    for row in rows:
        assert not set(row["neg"]) & {*row["pos"], row["query"]}


def test_example_config_output_is_ready_for_finetune(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "mined.jsonl"
    args = ["mine", "--config", "examples/mine.yaml", "--output", str(out)]
    result = CliRunner().invoke(app, normalize_argv(args))
    assert result.exit_code == 0, result.output
    report = check_file(str(out))  # the training data check of `raykit finetune`
    assert report.valid_rows == 40 and not report.invalid_rows
    summary = json.loads(result.output.split("mine summary: ")[1].splitlines()[0])
    given = [json.loads(line) for line in (ROOT / "examples/data/train.jsonl").open()]
    added = []
    for before, after in zip(given, map(json.loads, out.open()), strict=True):
        assert after["neg"][: len(before["neg"])] == before["neg"]  # kept, mined appended
        added.append(len(after["neg"]) - len(before["neg"]))
        assert not set(after["neg"]) & {*after["pos"], after["query"]}
    assert sum(added) == summary["negatives_mined"] and max(added) == 7
    assert summary["short_queries"] == sum(n < 7 for n in added)


def test_beir_layout_mines_like_the_same_groups(tmp_path):
    """Queries + qrels + corpus (BEIR) give the groups the qrels say, mined the same way; qrels
    lines without a text are counted."""
    beir = tmp_path / "beir"
    beir.mkdir()
    rows = [json.loads(line) for line in corpus_file(tmp_path).read_text().splitlines()]
    ids = {row["text"]: row["id"] for row in rows}
    write_jsonl(beir / "corpus.jsonl", [{"_id": i, "title": "", "text": t} for t, i in ids.items()])
    write_jsonl(
        beir / "queries.jsonl",
        [
            {"_id": "permit", "text": GROUPS[0]["query"]},
            {"_id": "beach", "text": GROUPS[1]["query"]},
        ],
    )
    (beir / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        f"permit\t{ids[PERMIT_POS]}\t1\nbeach\t{ids[BEACH_POS]}\t2\nbeach\t{ids[UNRELATED[0]]}\t0\n"
        "beach\tmissing-doc\t1\nmissing-query\td0\t1\n"
    )
    out = tmp_path / "beir_out.jsonl"
    summary = run_mine(
        MineConfig(
            queries=str(beir / "queries.jsonl"),
            qrels=str(beir / "test.tsv"),
            corpus=[str(beir / "corpus.jsonl")],
            output=str(out),
            range="0-10",
            negatives=2,
        )
    )
    permit, beach = [json.loads(line) for line in out.read_text().splitlines()]
    assert permit["pos"] == [PERMIT_POS] and sorted(permit["neg"]) == sorted(PERMIT_HARD)
    assert beach["pos"] == [BEACH_POS] and sorted(beach["neg"]) == sorted(BEACH_HARD)
    assert summary["skipped_reasons"] == {
        "qrels: document not in --corpus": 1,
        "qrels: query not in --queries": 1,
    }
    with pytest.raises(ConfigError, match="needs --queries, --qrels and --corpus"):
        MineConfig(queries=str(beir / "queries.jsonl"), qrels=str(beir / "test.tsv"))

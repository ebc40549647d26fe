"""First-stage BM25 run -> `raykit score --run` -> `raykit evaluate --run`, on our BEIR-layout
sample (examples/data/beir), with the TREC files checked line by line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from raykit.cli import app, normalize_argv
from raykit.core.metrics import evaluate_run
from raykit.core.reranker import Reranker
from raykit.data.trec import read_corpus, read_qrels, read_queries, read_run
from tests.helpers import ROOT

BEIR = ROOT / "examples" / "data" / "beir"


def cli(*argv: str) -> str:
    result = CliRunner().invoke(app, normalize_argv(list(argv)))
    assert result.exit_code == 0, result.output
    return result.output


def check_trec_lines(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    """Every line has six fields, ranks run 1..n per query and scores do not increase."""
    by_query: dict[str, list[tuple[str, int, float]]] = {}
    for line in path.read_text().splitlines():
        qid, q0, docid, rank, score, tag = line.split(" ")
        assert q0 == "Q0" and tag
        by_query.setdefault(qid, []).append((docid, int(rank), float(score)))
    for ranked in by_query.values():
        assert [rank for _, rank, _ in ranked] == list(range(1, len(ranked) + 1))
        assert all(a[2] >= b[2] for a, b in zip(ranked, ranked[1:], strict=False))
    return by_query


def test_readers_take_beir_jsonl_and_tsv(tmp_path):
    queries = read_queries(str(BEIR / "queries.jsonl"))
    assert len(queries) == 12 and queries["q0"].endswith("?")
    (tmp_path / "queries.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in queries.items()))
    assert read_queries(str(tmp_path / "queries.tsv")) == queries
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "Eggs", "text": "Boil them."}) + "\n"
    )
    assert read_corpus([str(tmp_path / "corpus.jsonl")], {"d1", "d9"}) == {"d1": "Eggs Boil them."}


@pytest.mark.slow
def test_bm25_then_rerank_then_evaluate(ray_cluster, tiny_model_dir, tmp_path):
    run = tmp_path / "bm25.trec"
    cli(
        "bm25",
        "--queries",
        str(BEIR / "queries.jsonl"),
        "--corpus",
        str(BEIR / "corpus.jsonl"),
        "--output",
        str(run),
        "--top_k",
        "10",
    )
    first_stage = check_trec_lines(run)
    assert set(first_stage) == set(read_queries(str(BEIR / "queries.jsonl")))
    # BM25 finds the answer among its top 10 for at least half of these questions.
    qrels = read_qrels(str(BEIR / "qrels" / "test.tsv"))
    found = sum(any(d == doc for d, _, _ in first_stage[q]) for q, doc, _ in qrels)
    assert found >= len(qrels) // 2

    # One line whose document is not in the corpus: counted and reported, never scored.
    with run.open("a") as f:
        f.write("q0 Q0 no-such-doc 11 0.1 bm25\n")
    out = tmp_path / "reranked"
    output = cli(
        "score",
        "--model",
        tiny_model_dir,
        "--run",
        str(run),
        "--queries",
        str(BEIR / "queries.jsonl"),
        "--corpus",
        str(BEIR / "corpus.jsonl"),
        "--output",
        str(out),
        "--format",
        "trec",
        "--max_len",
        "64",
        "--num_actors",
        "1",
    )
    assert "1 skipped ({'document not in --corpus': 1})" in output
    reranked = check_trec_lines(out / "bm25.trec")
    # Every (qid, docid) of the first stage exactly once, nothing else.
    assert {(q, d) for q, docs in reranked.items() for d, _, _ in docs} == {
        (q, d) for q, docs in first_stage.items() for d, _, _ in docs
    }
    assert sum(len(docs) for docs in reranked.values()) == sum(map(len, first_stage.values()))
    # Only what the README documents: the TREC run and the scored pairs.
    assert sorted(p.name for p in out.iterdir()) == ["bm25.parquet", "bm25.trec"]
    # The scores are the engine's (as Reranker gives them) to the printed precision.
    queries = read_queries(str(BEIR / "queries.jsonl"))
    corpus = read_corpus([str(BEIR / "corpus.jsonl")], {d for d, _, _ in reranked["q3"]})
    reranker = Reranker(tiny_model_dir, device="cpu", max_length=64)
    expected = reranker.compute_score([[queries["q3"], corpus[d]] for d, _, _ in reranked["q3"]])
    np.testing.assert_allclose([s for _, _, s in reranked["q3"]], expected, atol=1e-4)

    metrics_file = tmp_path / "metrics.json"
    printed = cli(
        "evaluate",
        "--run",
        str(out / "bm25.trec"),
        "--qrels",
        str(BEIR / "qrels" / "test.tsv"),
        "--metrics",
        "nDCG@10",
        "RR@10",
        "R@5",
        "--output",
        str(metrics_file),
    )
    written = json.loads(metrics_file.read_text())
    direct = evaluate_run(read_run(str(out / "bm25.trec")), qrels, ["nDCG@10", "RR@10", "R@5"])
    assert written == pytest.approx(direct)
    rounded = {k: round(v, 4) for k, v in direct.items()}
    # The JSON line (Ray may forward a worker's late output into the same stream).
    assert json.loads([x for x in printed.splitlines() if x.startswith("{")][-1]) == rounded


def test_score_run_needs_queries_and_corpus(tmp_path):
    (tmp_path / "run.trec").write_text("q0 Q0 doc1a 1 1.0 t\n")
    result = CliRunner().invoke(
        app,
        normalize_argv(
            ["score", "--run", str(tmp_path / "run.trec"), "--output", str(tmp_path / "o")]
        ),
    )
    assert result.exit_code == 2
    assert "run: needs --queries and --corpus" in result.output

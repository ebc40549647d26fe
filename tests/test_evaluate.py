"""IR evaluation: ir-measures on raykit's groups and on TREC runs + qrels, checked against values
worked out by hand from trec_eval's definitions."""

import json
import math

import pytest
from typer.testing import CliRunner

from raykit.cli import app, normalize_argv
from raykit.config import EvaluateConfig, TuneConfig, load_config
from raykit.core.metrics import evaluate_groups, evaluate_run, parse_metrics
from raykit.data.trec import read_qrels, read_run
from raykit.errors import ConfigError, DataError


def const_scorer(values: dict[str, float]):
    return lambda pairs: [values.get(p, 0.0) for _, p in pairs]


def test_groups_on_a_hand_made_ranking():
    # Relevant passages end up at ranks 2 and 4 of 4.
    group = {"query": "q", "pos": ["r1", "r2"], "neg": ["n1", "n2"]}
    scores = const_scorer({"n1": 4.0, "r1": 3.0, "n2": 2.0, "r2": 1.0})
    metrics = evaluate_groups([group], scores, ["RR@10", "AP", "nDCG@10", "P@2"])
    assert metrics["RR@10"] == pytest.approx(0.5)
    assert metrics["AP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    dcg, idcg = 1 / math.log2(3) + 1 / math.log2(5), 1 + 1 / math.log2(3)
    assert metrics["nDCG@10"] == pytest.approx(dcg / idcg)
    assert metrics["P@2"] == pytest.approx(0.5)


def test_cutoff_and_mean_over_groups():
    deep = {"query": "a", "pos": ["r"], "neg": [f"n{i}" for i in range(10)]}
    top = {"query": "b", "pos": ["r"], "neg": ["n0"]}
    values = {f"n{i}": 1.0 for i in range(10)}  # every negative above "r" (score 0)
    per_query = evaluate_groups([deep], const_scorer(values), ["RR@10", "nDCG@10", "AP"])
    assert per_query["RR@10"] == 0.0 and per_query["nDCG@10"] == 0.0
    assert per_query["AP"] == pytest.approx(1 / 11)
    both = evaluate_groups([deep, top], const_scorer({**values, "r": 2.0}), ["RR@10"])
    assert both["RR@10"] == pytest.approx(1.0)  # "r" wins both groups now
    mean = evaluate_groups([deep, top], const_scorer({"n0": 1.0}), ["RR@10"])
    # "deep": "r" ties with n1..n9 below n0 and goes last (rank 11); "top": rank 2.
    assert mean["RR@10"] == pytest.approx((0 + 0.5) / 2)


def test_ties_are_ranked_pessimistically_for_every_provider():
    # A constant scorer gets no credit for the positives-first input order, whichever
    # ir-measures provider computes the measure (they break ties differently on their own).
    group = {"query": "q", "pos": ["p"], "neg": ["a", "b"]}
    metrics = evaluate_groups([group], const_scorer({}), ["RR@10", "AP", "P@1", "nDCG@1"])
    assert metrics == {
        "RR@10": pytest.approx(1 / 3),
        "AP": pytest.approx(1 / 3),
        "P@1": 0.0,
        "nDCG@1": 0.0,
    }


def test_evaluate_groups_scores_every_candidate_once():
    groups = [
        {"query": "q1", "pos": ["good"], "neg": ["bad", "worse"]},
        {"query": "q2", "pos": ["good"], "neg": ["bad"]},
    ]
    seen = []

    def score(pairs):
        seen.extend(pairs)
        return [1.0 if p == "good" else 0.0 for _, p in pairs]

    assert evaluate_groups(groups, score) == {"nDCG@10": 1.0, "RR@10": 1.0, "AP": 1.0}
    assert sorted(map(tuple, seen)) == sorted(
        [("q1", "good"), ("q1", "bad"), ("q1", "worse"), ("q2", "good"), ("q2", "bad")]
    )


RUN = """\
q1 Q0 d1 1 9.0 bm25
q1 Q0 d2 2 8.0 bm25
q1 Q0 d3 3 7.0 bm25
q1 Q0 d4 4 6.0 bm25
q2 Q0 d5 1 5.0 bm25
q2 Q0 d6 2 4.0 bm25
"""
QRELS = """\
q1 0 d1 0
q1 0 d2 2
q1 0 d4 1
q1 0 d9 1
q2 0 d6 1
q3 0 d7 1
"""


def hand_made_values() -> dict[str, float]:
    """trec_eval's definitions (linear gains, log2(rank + 1) discounts, AP over all relevant
    documents, judged queries missing from the run count 0), for RUN and QRELS above."""
    log2 = math.log2
    q1_dcg3 = 2 / log2(3)  # d2 (rel 2) at rank 2; d1, d3 not relevant
    q1_idcg3 = 2 / log2(2) + 1 / log2(3) + 1 / log2(4)  # rels 2, 1, 1
    q2_ndcg3 = (1 / log2(3)) / 1.0  # d6 at rank 2
    q1_ap = (1 / 2 + 2 / 4) / 3  # hits at ranks 2 and 4; d9 never retrieved
    q2_ap = 1 / 2
    return {
        "nDCG@3": (q1_dcg3 / q1_idcg3 + q2_ndcg3 + 0) / 3,
        "AP": (q1_ap + q2_ap + 0) / 3,
        "RR@10": (1 / 2 + 1 / 2 + 0) / 3,
        "R@2": (1 / 3 + 1 + 0) / 3,
    }


def test_trec_run_against_qrels_equals_hand_worked_trec_eval_values(tmp_path):
    (tmp_path / "run.trec").write_text(RUN)
    (tmp_path / "qrels.txt").write_text(QRELS)
    run, qrels = read_run(str(tmp_path / "run.trec")), read_qrels(str(tmp_path / "qrels.txt"))
    metrics = evaluate_run(run, qrels, ["nDCG@3", "AP", "RR@10", "R@2"])
    expected = hand_made_values()
    assert metrics == {k: pytest.approx(v, abs=1e-9) for k, v in expected.items()}


def test_beir_tsv_qrels_read_like_trec_qrels(tmp_path):
    beir = "query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{r}\n" for q, _, d, r in (line.split() for line in QRELS.splitlines())
    )
    (tmp_path / "test.tsv").write_text(beir)
    (tmp_path / "qrels.txt").write_text(QRELS)
    assert read_qrels(str(tmp_path / "test.tsv")) == read_qrels(str(tmp_path / "qrels.txt"))


def test_evaluate_command_on_a_run_prints_and_writes_json(tmp_path):
    (tmp_path / "run.trec").write_text(RUN)
    (tmp_path / "qrels.txt").write_text(QRELS)
    out = tmp_path / "eval" / "metrics.json"
    argv = [
        "evaluate",
        "--run",
        str(tmp_path / "run.trec"),
        "--qrels",
        str(tmp_path / "qrels.txt"),
        "--metrics",
        "nDCG@3",
        "AP",
        "--output",
        str(out),
    ]
    result = CliRunner().invoke(app, normalize_argv(argv))
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    expected = hand_made_values()
    # metric_for_best_model (nDCG@10) is always measured too.
    assert list(written) == ["nDCG@3", "AP", "nDCG@10"]
    assert written["nDCG@3"] == pytest.approx(expected["nDCG@3"])
    assert written["AP"] == pytest.approx(expected["AP"])
    line = [x for x in result.output.splitlines() if x.startswith("{")][-1]
    assert json.loads(line)["AP"] == round(expected["AP"], 4)


@pytest.mark.parametrize(
    ("run_text", "message"),
    [
        ("q1 Q0 d1 1 9.0\n", "run.trec:1: expected 'qid Q0 docid rank score tag'"),
        ("q1 Q0 d1 1 9.0 t\nq1 Q0 d2 2 high t\n", "run.trec:2: rank must be an integer and score"),
        ("q1 Q0 d1 1 9.0 t\nq1 Q0 d1 2 8.0 t\n", "run.trec:2: document 'd1' listed twice"),
    ],
)
def test_bad_run_lines_are_named(tmp_path, run_text, message):
    (tmp_path / "run.trec").write_text(run_text)
    (tmp_path / "qrels.txt").write_text(QRELS)
    argv = ["evaluate", "--run", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "qrels.txt")]
    result = CliRunner().invoke(app, normalize_argv(argv))
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_qrels_line_is_named(tmp_path):
    (tmp_path / "qrels.txt").write_text("q1 0 d1 1\nq1 0 d2 very\n")
    with pytest.raises(DataError, match=r"qrels.txt:2: relevance must be an integer"):
        read_qrels(str(tmp_path / "qrels.txt"))


def test_measure_names_are_checked_and_legacy_names_read():
    assert parse_metrics(["ndcg@10", "mrr@10", "map", "R@100"]) == [
        "nDCG@10",
        "RR@10",
        "AP",
        "R@100",
    ]
    with pytest.raises(ConfigError, match="metrics: unknown measure 'NDGC@10'"):
        load_config(EvaluateConfig, eval_data=["x.jsonl"], metrics=["NDGC@10"])
    cfg = load_config(
        EvaluateConfig, eval_data=["x.jsonl"], metrics=["AP"], metric_for_best_model="RR@5"
    )
    assert cfg.metrics == ["AP", "RR@5"]


def test_tune_metric_key_still_works(tmp_path, capsys):
    path = tmp_path / "tune.yaml"
    path.write_text(
        "train_data: [a.jsonl]\neval_data: [b.jsonl]\nmetric: map\n"
        "search: {learning_rate: 'loguniform:1e-6:1e-4'}\n"
    )
    cfg = load_config(TuneConfig, path)
    assert cfg.metric_for_best_model == "AP" and "AP" in cfg.metrics
    assert "'metric' is now 'metric_for_best_model'" in capsys.readouterr().err
    argv = normalize_argv(["tune", "--metric", "mrr@10"])
    assert argv == ["tune", "--metric_for_best_model", "mrr@10"]


def test_run_and_model_inputs_are_exclusive(tmp_path):
    (tmp_path / "run.trec").write_text(RUN)
    with pytest.raises(ConfigError, match="run/qrels: give both"):
        load_config(EvaluateConfig, run=str(tmp_path / "run.trec"))
    with pytest.raises(ConfigError, match="qrels: no such file"):
        load_config(EvaluateConfig, run=str(tmp_path / "run.trec"), qrels=str(tmp_path / "q"))
    with pytest.raises(ConfigError, match="eval_data: at least one file"):
        load_config(EvaluateConfig)

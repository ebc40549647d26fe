"""Sweeps on the tiny model: spec parsing, best trial, export, failing trials."""

from __future__ import annotations

import json
import re

import pytest
from ray import tune
from typer.testing import CliRunner

from raykit.cli import app, normalize_argv
from raykit.config import ConfigError, EvaluateConfig, parse_search
from raykit.scoring.evaluate import evaluate_model
from raykit.training.tune import search_space
from tests.helpers import SAMPLE_DEV, marked_train_file


def test_search_specs_become_tune_domains():
    space = search_space(
        [
            "learning_rate=loguniform:1e-6:1e-4",
            "train_group_size=choice:4,8,16",
            "warmup_ratio=uniform:0:0.2",
            "max_len=grid:64,128",
            "fp16=choice:true,false",
        ]
    )
    assert isinstance(space["learning_rate"], tune.search.sample.Float)
    assert space["learning_rate"].lower == 1e-6 and space["learning_rate"].upper == 1e-4
    assert space["train_group_size"].categories == [4, 8, 16]
    assert space["max_len"] == {"grid_search": [64, 128]}
    assert space["fp16"].categories == [True, False]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("learning_rate=loguniform:1e-4:1e-6", "LO < HI"),
        ("learnin_rate=loguniform:1e-6:1e-4", "unknown or unsearchable key 'learnin_rate'"),
        ("learning_rate=lognormal:1e-6:1e-4", "unknown distribution 'lognormal'"),
        ("learning_rate=loguniform:0:1e-4", "LO > 0"),
        ("train_group_size=uniform:2:8", "use choice or grid"),
        ("train_group_size=choice:four", "values must be int"),
        ("learning_rate", "expected KEY=DIST:ARGS"),
    ],
)
def test_bad_search_specs_fail_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_search([spec])


RAY_WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+")


def test_cli_rejects_a_bad_spec_before_starting(tmp_path):
    result = CliRunner().invoke(
        app,
        normalize_argv(
            [
                "tune",
                "--train_data",
                "x.jsonl",
                "--eval_data",
                "y.jsonl",
                "--search",
                "learning_rate=loguniform:1e-4:1e-6",
            ]
        ),
    )
    assert result.exit_code == 2
    assert "LO < HI" in result.output
    # Lines a Ray worker left over from an earlier test forwards to this process are not ours.
    lines = result.output.splitlines()
    own_lines = [line for line in lines if line and not RAY_WORKER_LINE.match(line)]
    assert len(own_lines) == 1, result.output
    assert own_lines[0].startswith("error: --search")


@pytest.mark.slow
def test_sweep_picks_the_better_trial_survives_a_failing_one_and_exports_best(
    ray_cluster, tiny_model_dir, tmp_path
):
    out = tmp_path / "sweep"
    args = [
        "tune",
        "--model_name_or_path",
        tiny_model_dir,
        "--train_data",
        str(marked_train_file(tmp_path)),
        "--eval_data",
        str(marked_train_file(tmp_path, SAMPLE_DEV)),
        "--output_dir",
        str(out),
        "--max_steps",
        "12",
        "--eval_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--train_group_size",
        "4",
        "--max_len",
        "64",
        "--logging_steps",
        "4",
        "--num_samples",
        "1",
        "--scheduler",
        "asha",
        "--max_concurrent_trials",
        "2",
        "--report_to",
        "tensorboard",
        "--search",
        "learning_rate=grid:1e-9,5e-3",
        "--search",
        f"model_name_or_path=grid:{tiny_model_dir},{tmp_path / 'missing-model'}",
    ]
    result = CliRunner().invoke(app, normalize_argv(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output

    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "ERROR"]
    assert len(failed) == 2 and all("missing-model" in r["model_name_or_path"] for r in failed)
    # ASHA may stop the weak trial early (STOPPED); every trial's checkpoints still count.
    ok = {r["learning_rate"]: r for r in rows if r["status"] != "ERROR"}
    assert set(ok) == {1e-9, 5e-3}
    assert ok[5e-3]["best_nDCG@10"] > ok[1e-9]["best_nDCG@10"]
    assert (out / "trials.csv").read_text().startswith("trial,")
    # The sweep's console: each trial's reports as lines on the driver.
    assert re.search(r"^\[raykit\] \S+: step 4 loss \d\.\d{4} nDCG@10 ", result.output, re.M)
    # Tracking, per trial: TensorBoard files in each trial's folder with its eval series.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bests = []
    for folder in (out / "ray" / "sweep" / "trials").glob("*/tensorboard"):
        events = EventAccumulator(str(folder))
        events.Reload()
        bests.append(max(e.value for e in events.Scalars("eval/nDCG_at_10")))
    expected = sorted(row["best_nDCG@10"] for row in ok.values())
    assert sorted(bests) == pytest.approx(expected, abs=1e-4)

    best = json.loads((out / "best" / "train_summary.json").read_text())
    # The exported model is the best evaluation of all, also when ASHA ended its trial at
    # max_t on that very report.
    assert best["best_metrics"]["nDCG@10"] == pytest.approx(ok[5e-3]["best_nDCG@10"], abs=1e-4)
    assert best["best_metrics"]["config/learning_rate"] == 5e-3
    card = (out / "best" / "README.md").read_text()  # the model card names the winning trial's
    assert "The best of 4 trials" in card and "learning_rate: 0.005" in card  # settings
    # ... and the exported weights are that checkpoint's: evaluating them gives its metric.
    marked_dev = str(marked_train_file(tmp_path, SAMPLE_DEV))
    again = evaluate_model(
        EvaluateConfig(model_name_or_path=str(out / "best"), max_len=64, eval_data=[marked_dev])
    )
    assert again["nDCG@10"] == pytest.approx(best["best_metrics"]["nDCG@10"], abs=1e-4)


def test_release_placement_group_frees_a_leftover_worker_group(ray_cluster):
    from ray.util.placement_group import placement_group, placement_group_table

    from raykit.training.tune import release_placement_group

    group = placement_group([{"CPU": 0.01}])
    ray_cluster.get(group.ready(), timeout=60)
    release_placement_group(group.id.hex())
    assert placement_group_table(group)["state"] == "REMOVED"
    release_placement_group(group.id.hex())  # already gone: a no-op
    release_placement_group(None)


def test_sweep_refuses_earlier_results_but_resumes_its_own_state(tmp_path):
    from raykit.config import TuneConfig
    from raykit.training.tune import run_sweep

    out = tmp_path / "sweep"
    (out / "ray").mkdir(parents=True)  # an interrupted sweep's state only: allowed (resume)
    (out / "trials.csv").write_text("trial\n")  # results of an earlier sweep: refused
    cfg = TuneConfig(
        train_data=["x.jsonl"],
        eval_data=["y.jsonl"],
        output_dir=str(out),
        search=["learning_rate=loguniform:1e-5:1e-4"],
    )
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite_output_dir"):
        run_sweep(cfg)
    (out / "trials.csv").unlink()
    cfg.model_name_or_path = str(tmp_path / "no-model")
    with pytest.raises(ConfigError, match="model_name_or_path: .* is neither a local folder"):
        run_sweep(cfg)  # past the output check, stopped by the next one, before Ray starts


def test_trial_rows_take_the_config_of_a_trial_that_never_reported():
    """A resumed sweep can hold a trial whose Result has no metrics (so `config` is None): its
    parameters come from the trial itself instead of crashing the sweep at the very end."""
    from types import SimpleNamespace

    from raykit.training.tune import _trial_rows

    reported = SimpleNamespace(
        config={"learning_rate": 1e-3}, metrics_dataframe=None, error=None, path="/s/trial_a"
    )
    silent = SimpleNamespace(config=None, metrics_dataframe=None, error=None, path="/s/trial_b")
    results = [reported, silent]
    trials = [
        SimpleNamespace(path="/s/trial_a", config={"learning_rate": 1e-3}),
        SimpleNamespace(path="/s/trial_b", config={"learning_rate": 2e-3}),
    ]

    class Grid(list):
        _experiment_analysis = SimpleNamespace(trials=trials)

    rows = _trial_rows(Grid(results), "nDCG@10", ["learning_rate"], max_steps=10)
    assert [(r["trial"], r["learning_rate"], r["status"]) for r in rows] == [
        ("trial_a", 1e-3, "STOPPED"),
        ("trial_b", 2e-3, "STOPPED"),
    ]

"""End-to-end fine-tunes on the tiny model: CLI, loss, export, resume (`ray job submit` of
jobs/finetune.py runs in test_cluster.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from raykit.cli import app, normalize_argv
from raykit.config import FinetuneConfig, load_config
from raykit.core.activation import sigmoid_array
from raykit.core.reranker import Reranker
from raykit.training.recipe import (
    SHUFFLE_BUFFER_BYTES,
    FinetuneRecipe,
    ThroughputWindow,
    _micro_batches,
    plan_steps,
)
from tests.helpers import (
    SAMPLE_DEV,
    SAMPLE_TRAIN,
    marked_train_file,
    raykit_lines,
    run_cli,
    stale_output_dir,
    tiny_args,
    tiny_options,
    wait_for,
)


def test_plan_gives_every_worker_the_same_steps():
    cfg = FinetuneConfig(
        train_data=["x"],
        num_workers=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
    )
    plan = plan_steps(cfg, 100)  # 33 groups per worker -> 9 micro-batches -> 5 steps
    assert (plan.groups_per_worker, plan.micro_batches_per_epoch) == (33, 9)
    assert (plan.steps_per_epoch, plan.total_steps) == (5, 10)
    cfg.dataloader_drop_last = True
    assert plan_steps(cfg, 100).micro_batches_per_epoch == 8
    cfg.max_steps = 7
    assert plan_steps(cfg, 100).total_steps == 7


def test_the_shuffle_buffer_holds_a_small_shard_whole_and_a_large_one_by_bytes():
    cfg = FinetuneConfig(train_data=["x"], num_workers=2, per_device_train_batch_size=2)
    # CQA: 720 groups in 1.28 MB; each worker's 360 are shuffled whole.
    assert plan_steps(cfg, 720, 1_283_705).shuffle_rows == 360
    # 1M groups of 3.6 kB: a buffer of SHUFFLE_BUFFER_BYTES, not the 500k-group shard; of
    # 1.8 kB (CQA's): at most SHUFFLE_BUFFER_ROWS' 16384.
    plan = plan_steps(cfg, 1_000_000, 3_600_000_000)
    assert plan.shuffle_rows == SHUFFLE_BUFFER_BYTES * 1_000_000 // 3_600_000_000 == 9320
    assert plan_steps(cfg, 1_000_000, 1_783_000_000).shuffle_rows == 16384
    # Huge groups still shuffle 64 at a time; unknown sizes get the same floor.
    assert plan_steps(cfg, 10_000, 10**12).shuffle_rows == 64
    assert plan_steps(cfg, 10_000).shuffle_rows == 64


def test_each_epoch_shuffles_the_whole_shard_anew_and_a_resumed_epoch_repeats_it(ray_cluster):
    import ray

    records = [{"query": f"q{i}", "pos": ["p"], "neg": ["n"]} for i in range(400)]
    shard = ray.data.from_items(records).streaming_split(1, equal=True)[0]
    cfg = FinetuneConfig(train_data=["x"], per_device_train_batch_size=4)
    plan = plan_steps(cfg, len(records))
    plan.shuffle_rows = 400  # as for a shard that fits the buffer

    def order(epoch: int, skip: int = 0) -> list[int]:
        batches = _micro_batches(shard, cfg, plan, epoch, skip)
        return [int(r["query"][1:]) for _, rows in batches for r in rows]

    first, second = order(0), order(1)
    assert sorted(first) == sorted(second) == list(range(400))
    assert first != second
    # Shuffled across the shard, not in a window moving down the file: the first 8 groups
    # come from all over it.
    assert max(first[:8]) - min(first[:8]) > 200
    assert order(0, skip=10) == first[40:]  # resuming at micro-batch 10 of epoch 0


def test_only_evaluations_and_checkpoints_are_reported_to_ray():
    """A `ray.train.report` waits until Ray Train's controller has taken the previous one (it
    polls every 2 s), so a logged step is not a report: logging every step, evaluating every 5
    and saving every 4, 12 steps report at 4, 5, 8, 10 and 12 only, and log all 12."""
    calls: dict[str, list] = {"report": [], "log": [], "eval": []}
    recipe = SimpleNamespace(
        cfg=SimpleNamespace(eval_steps=5, save_steps=4, logging_steps=1),
        plan=SimpleNamespace(total_steps=12),
        eval_groups=["a group"],
        evaluate=lambda label: calls["eval"].append((recipe.step, label)),
        log_progress=lambda: calls["log"].append(recipe.step) or {"loss": 1.0},
        report=lambda metrics, save: calls["report"].append((recipe.step, save)),
    )
    for recipe.step in range(1, 13):
        FinetuneRecipe._between_steps(recipe)
    assert calls["report"] == [(4, True), (5, False), (8, True), (10, False), (12, True)]
    assert calls["eval"] == [(5, ""), (10, ""), (12, "final")]
    assert calls["log"] == list(range(1, 13))


def test_throughput_window_sums_and_reports_rates():
    window = ThroughputWindow()
    window.add(loss=2.0, groups=4, real_tokens=300, padded_tokens=400)
    window.add(loss=1.0, groups=4, real_tokens=100, padded_tokens=100)
    window.seconds = 2.0
    total = window.all_reduce(torch.device("cpu"), world_size=1)  # no process group: itself
    assert total == window and total.mean_loss == 1.5
    assert total.rates(group_size=4) == pytest.approx(
        {"pairs_per_s": 16.0, "tokens_per_s": 200.0, "padding": 0.2}
    )
    assert ThroughputWindow().mean_loss == 0.0  # an empty window logs 0, never divides by 0


@pytest.mark.slow
def test_two_worker_cli_finetune_lowers_loss_and_writes_hf_model(
    ray_cluster, tiny_model_dir, tmp_path
):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification

    args = tiny_args(
        tiny_model_dir,
        tmp_path,
        num_workers="2",
        num_train_epochs="6",
        train_data=str(marked_train_file(tmp_path)),
        learning_rate="3e-3",
        eval_data=str(SAMPLE_DEV),
        eval_steps="10",
    )
    output = run_cli(args).output
    table = {line.split("  ")[0]: line for line in output.splitlines() if not line.startswith("[")}
    assert {"before training", "after training", "best step", "throughput", "model"} <= set(table)

    out = tmp_path / "out"
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [entry["loss"] for entry in summary["loss"]]
    assert summary["steps"] == 30 and len(losses) == 30  # 40 groups / 2 workers / 4 = 5 per epoch
    # Where the seconds before the first step went, stage by stage, in order.
    startup = summary["startup_s"]
    stages = ["ray", "data", "workers", "model", "setup", "first_eval", "first_step"]
    assert list(startup) == stages and sorted(startup.values()) == list(startup.values())
    assert startup["first_step"] == pytest.approx(summary["time_to_first_step_s"], abs=0.01)
    split = next(line for line in output.splitlines() if "start-up: launch and Ray " in line)
    assert "trainer and workers" in split and "first eval" in split and "first step" in split
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.25
    # Model FLOP utilisation, per logged step and over the run, against the measured CPU peak.
    assert summary["peak_flops"]["source"] == "measured GEMM"
    assert all(0 < entry["mfu"] < 1 for entry in summary["loss"]) and 0 < summary["mfu"] < 1
    assert " mfu " in next(line for line in output.splitlines() if "step 30/30" in line)
    assert [e["step"] for e in summary["eval"]] == [0, 10, 20, 30]
    assert summary["best_metrics"]["nDCG@10"] == max(e["nDCG@10"] for e in summary["eval"][1:])
    card = ModelCard.load(out / "README.md")  # the model card, read by the hub's own parser
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {
        k: round(summary["best_metrics"][k], 4) for k in ("nDCG@10", "RR@10", "AP")
    }
    assert "40 valid groups" in card.text and "learning_rate: 0.003" in card.text

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    assert not (out / "trainer_state.pt").exists()
    assert (out / "tokenizer.json").exists()
    # The export knows how it scores, and scores the same in sentence-transformers.
    spec = json.loads((out / "raykit_reranker.json").read_text())
    assert spec["kind"] == "encoder" and spec["max_len"] == 64
    from sentence_transformers import CrossEncoder

    pairs = [["what is ray?", "a distributed compute engine"], ["what is ray?", "a fruit"]]
    raw = np.array(Reranker(str(out)).compute_score(pairs))
    predicted = CrossEncoder(str(out), device="cpu").predict(pairs)
    np.testing.assert_allclose(predicted, sigmoid_array(raw), atol=1e-5)


def test_bad_training_data_stops_the_cli_with_file_and_line(ray_cluster, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    shutil.copy(SAMPLE_TRAIN, bad)
    with open(bad, "a") as f:
        f.write('{"query": "q", "pos": "not a list", "neg": ["n"]}\n')
    args = tiny_args(tiny_model_dir, tmp_path, train_data=str(bad))
    result = CliRunner().invoke(app, normalize_argv(args))
    assert result.exit_code == 1
    assert f"{bad}:41: pos: expected a list of strings" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_bad_row_found_beside_training_stops_every_worker(
    ray_cluster, tiny_model_dir, tmp_path, caplog
):
    """Training starts once the rows are counted; validation of a large file runs beside it and
    its bad last row stops both workers at the same step (no hang in a collective, no export)."""
    from raykit.errors import DataError
    from raykit.training.launch import finetune

    rows = 400_000
    path = tmp_path / "large.jsonl"
    with open(path, "w") as f:
        f.writelines(
            f'{{"query": "q{i}", "pos": ["p {i}"], "neg": ["n", "m", "o"]}}\n'
            for i in range(rows - 1)
        )
        f.write('{"query": "q", "pos": ["p"], "neg": []}\n')
    options = tiny_options(tiny_model_dir, tmp_path, train_data=str(path), max_steps="100000")
    error = rf"{path}:{rows}: neg: neg has no passages"
    with caplog.at_level(logging.INFO, logger="raykit"), pytest.raises(DataError, match=error):
        finetune(FinetuneConfig(**options, num_workers=2), console=False)
    assert "validating beside training" in caplog.text
    assert not (tmp_path / "out" / "model.safetensors").exists()


PAUSED_DRIVER = """
import json, sys, time
from pathlib import Path

from ray.train import UserCallback

from raykit.config import FinetuneConfig, load_config
from raykit.training.launch import finetune


class PauseAfterCheckpoint(UserCallback):
    \"\"\"Runs in the Ray Train controller: after the first checkpoint at or past `step`, say so
    in `marker` and hold the controller there, so that the test kills this driver mid-run.\"\"\"

    def __init__(self, step, marker):
        self.step, self.marker = step, marker

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None and metrics[0]["step"] >= self.step:
            Path(self.marker).write_text(str(metrics[0]["step"]))
            time.sleep(3600)


config, step, marker = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
finetune(FinetuneConfig(**config), callbacks=[PauseAfterCheckpoint(step, marker)])
"""


@pytest.mark.slow
@pytest.mark.fault
def test_killed_driver_resumes_and_reproduces_the_uninterrupted_losses(
    ray_cluster, tiny_model_dir, tmp_path
):
    """A run whose driver is killed after its step-6 checkpoint, run again under the same name,
    goes on from its last checkpoint (optimizer, scheduler, RNG, data position) and its losses
    equal an uninterrupted run's, step for step."""
    extra = {"max_steps": "12", "save_steps": "3", "train_data": str(marked_train_file(tmp_path))}
    args = tiny_args(tiny_model_dir, tmp_path, run_name="resume", **extra)
    options = tiny_options(tiny_model_dir, tmp_path, run_name="resume", **extra)
    config = dataclasses.asdict(load_config(FinetuneConfig, **options))
    marker = tmp_path / "paused"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    with open(tmp_path / "first_run.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-c", PAUSED_DRIVER, json.dumps(config), "6", str(marker)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            # The uninterrupted run meanwhile, in this process (one worker each: both fit).
            reference_args = tiny_args(
                tiny_model_dir, tmp_path / "reference", run_name="reference", **extra
            )
            run_cli(reference_args)
            wait_for(lambda: marker.exists() or first.poll() is not None, 300, "the checkpoint")
            assert marker.exists(), (tmp_path / "first_run.log").read_text()[-3000:]
            # A second driver of the same run is refused while the first one lives.
            second = CliRunner().invoke(app, normalize_argv(args))
            assert second.exit_code == 1 and "'resume' is already running" in second.output
            os.killpg(first.pid, signal.SIGKILL)  # a crashed or killed driver
        finally:
            first.wait(timeout=60)
    # Re-run at once: the killed driver's controller and workers may still be alive.
    run_cli(args)
    reference = json.loads((tmp_path / "reference" / "out" / "train_summary.json").read_text())
    resumed = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert resumed["resumed_from_step"] in (3, 6)  # the last checkpoint the controller took in
    assert resumed["steps"] == reference["steps"] == 12
    # One loss per step, nothing repeated or lost around the resume point, and the same losses.
    assert [e["step"] for e in resumed["loss"]] == list(range(1, 13))
    expected = [e["loss"] for e in reference["loss"]]
    assert [e["loss"] for e in resumed["loss"]] == pytest.approx(expected, abs=1e-5)
    # ... and so does the model it exports.
    final = load_file(tmp_path / "out" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "reference" / "out" / "model.safetensors")
    assert final.keys() == uninterrupted.keys()
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=1e-5)


def test_a_non_empty_output_dir_is_refused_before_anything_starts(tiny_model_dir, tmp_path):
    """Without --overwrite_output_dir a non-empty output_dir stops the command before Ray
    starts; with it, the folder is replaced whole (test_console's --verbose run checks that)."""
    out = stale_output_dir(tmp_path / "out")
    args = tiny_args(tiny_model_dir, tmp_path, max_steps="2")
    refused = CliRunner().invoke(app, normalize_argv(args))
    assert refused.exit_code == 1
    assert f"output_dir: {out} is not empty; pass --overwrite_output_dir" in refused.output
    assert (out / "notes.txt").exists() and not (tmp_path / "ray").exists()  # nothing started


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("model_name_or_path", "/no/such/model", "is neither a local folder nor a model"),
        ("output_dir", "{tmp}/a-file/out", "is a file"),
        ("train_data", "{tmp}/missing.jsonl", "no such file or directory"),
    ],
)
def test_unusable_paths_are_one_line_errors_before_anything_starts(
    tiny_model_dir, tmp_path, flag, value, message
):
    (tmp_path / "a-file").write_text("x")
    args = tiny_args(tiny_model_dir, tmp_path, **{flag: value.format(tmp=tmp_path)})
    result = CliRunner().invoke(app, normalize_argv(args))
    assert result.exit_code == 2  # a usage error, found with the options: Ray never starts
    lines = raykit_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_linear_schedule_is_transformers_schedule():
    """The recipe's own warm-up/decay schedule gives transformers' lr at every step."""
    from transformers import get_linear_schedule_with_warmup

    from raykit.training.recipe import linear_schedule

    def lrs(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = make(optimizer, 3, 10)
        values = []
        for _ in range(12):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    assert lrs(linear_schedule) == lrs(get_linear_schedule_with_warmup)

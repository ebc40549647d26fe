"""End-to-end fine-tunes on the tiny model: CLI, loss, export, resume, `ray job submit`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raykit.cli import app, normalize_argv
from raykit.config import FinetuneConfig
from raykit.train import plan_steps
from tests.conftest import ROOT, SAMPLE_DEV, SAMPLE_TRAIN, write_jsonl


def run_cli(args: list[str]):
    result = CliRunner().invoke(app, normalize_argv(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def tiny_args(model: str, tmp_path: Path, **extra) -> list[str]:
    args = {
        "model_name_or_path": model,
        "train_data": str(SAMPLE_TRAIN),
        "output_dir": str(tmp_path / "out"),
        "storage_path": str(tmp_path / "ray"),
        "learning_rate": "1e-3",
        "train_group_size": "4",
        "per_device_train_batch_size": "4",
        "max_len": "64",
        "logging_steps": "1",
        "warmup_ratio": "0.1",
        **extra,
    }
    return ["finetune"] + [x for k, v in args.items() for x in (f"--{k}", v)]


def test_plan_gives_every_worker_the_same_steps():
    cfg = FinetuneConfig(train_data=["x"], num_workers=3, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, num_train_epochs=2)  # fmt: skip
    plan = plan_steps(cfg, 100)  # 33 groups per worker -> 9 micro-batches -> 5 steps
    assert (plan.groups_per_worker, plan.micro_batches_per_epoch) == (33, 9)
    assert (plan.steps_per_epoch, plan.total_steps) == (5, 10)
    cfg.dataloader_drop_last = True
    assert plan_steps(cfg, 100).micro_batches_per_epoch == 8
    cfg.max_steps = 7
    assert plan_steps(cfg, 100).total_steps == 7


def marked_train_file(tmp_path: Path, source: Path = SAMPLE_TRAIN) -> Path:
    """The sample groups with a marker on every positive: a signal a random 2-layer BERT can
    learn in a few dozen steps, so a falling loss shows that the loop really optimises."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    for row in rows:
        row["pos"] = [f"yes, this answers it: {p}" for p in row["pos"]]
        row["neg"] = [f"no: {n}" for n in row["neg"]]
    return write_jsonl(tmp_path / f"marked-{source.name}", rows)


def test_two_worker_cli_finetune_lowers_loss_and_writes_hf_model(
    ray_cluster, tiny_model_dir, tmp_path
):
    from transformers import AutoModelForSequenceClassification

    args = tiny_args(tiny_model_dir, tmp_path, num_workers="2", num_train_epochs="6",
                     train_data=str(marked_train_file(tmp_path)), learning_rate="3e-3",
                     eval_data=str(SAMPLE_DEV), eval_steps="10")  # fmt: skip
    output = run_cli(args).output
    assert "dev before:" in output and "dev after:" in output

    out = tmp_path / "out"
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [entry["loss"] for entry in summary["loss"]]
    assert summary["steps"] == 30 and len(losses) == 30  # 40 groups / 2 workers / 4 = 5 per epoch
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.25
    assert [e["step"] for e in summary["eval"]] == [0, 10, 20, 30]
    assert summary["best_metrics"]["ndcg@10"] == max(e["ndcg@10"] for e in summary["eval"][1:])

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    assert not (out / "trainer_state.pt").exists()
    assert (out / "tokenizer.json").exists()


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


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_rerun_with_same_run_name_resumes_an_interrupted_run(ray_cluster, tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, tmp_path, max_steps="60", save_steps="3", run_name="resume")
    snapshot = tmp_path / "ray" / "resume" / "checkpoint_manager_snapshot.json"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    with open(tmp_path / "first_run.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "raykit.cli", *normalize_argv(args)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            _wait_for(snapshot.exists, 180, "the first checkpoint")
            # A second driver of the same run is refused while the first one lives.
            second = CliRunner().invoke(app, normalize_argv(args))
            assert second.exit_code == 1 and "'resume' is already running" in second.output
            os.killpg(first.pid, signal.SIGKILL)  # a crashed or killed driver
        finally:
            first.wait(timeout=60)
    assert first.returncode != 0, "the first run was meant to be interrupted"
    # Re-run at once: the killed driver's controller and workers may still be alive.

    run_cli(args)
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert 3 <= summary["resumed_from_step"] < 60
    assert summary["resumed_from_step"] % 3 == 0
    assert summary["steps"] == 60
    # One loss entry per step: nothing repeated, nothing lost around the resume point.
    assert [entry["step"] for entry in summary["loss"]] == list(range(1, 61))


@pytest.mark.skipif(not (Path(sys.executable).parent / "ray").exists(), reason="no ray CLI")
def test_ray_job_submit_runs_jobs_finetune(tiny_model_dir, tmp_path):
    """`ray job submit` of jobs/finetune.py against a separately started `ray start --head`."""
    venv_bin = str(Path(sys.executable).parent)
    # The head runs job entrypoints with its own PATH: start it from the venv that has raykit.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = os.path.join(venv_bin, "ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="rk-head-", dir="/tmp"))  # short: AF_UNIX paths
    # Free ports, so this head does not collide with the tests' own Ray instance.
    gcs, dashboard, agent = free_ports(3)
    start = subprocess.run(
        [ray_bin, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", "--num-cpus=3", "--include-dashboard=true",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        args = tiny_args(tiny_model_dir, tmp_path, max_steps="4", num_workers="2")[1:]
        deadline = time.time() + 120
        while True:  # the job agent comes up a little after `ray start` returns
            submit = subprocess.run(
                [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dashboard}",
                 f"--working-dir={ROOT}", "--", "python", "jobs/finetune.py", *args],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
        assert (tmp_path / "out" / "model.safetensors").exists()
    finally:
        stop_processes_mentioning(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop_processes_mentioning(text: str) -> None:
    """Stop one Ray cluster's processes (`ray stop` would also stop the tests' own cluster)."""

    def matching() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if text in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in matching():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while matching() and time.time() < deadline:
            time.sleep(0.5)


def test_output_dir_is_refused_when_not_empty_and_replaced_whole_when_asked(
    ray_cluster, tiny_model_dir, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"stale weights a loader would pick")
    (out / "notes.txt").write_text("someone's notes")
    args = tiny_args(tiny_model_dir, tmp_path, max_steps="2")
    refused = CliRunner().invoke(app, normalize_argv(args))
    assert refused.exit_code == 1
    assert f"output_dir: {out} is not empty; pass --overwrite_output_dir" in refused.output
    assert (out / "notes.txt").exists() and not (tmp_path / "ray").exists()  # nothing started

    run_cli(args + ["--overwrite_output_dir"])
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "train_summary.json"} <= files
    assert not files & {"pytorch_model.bin", "notes.txt"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


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
    assert result.exit_code == 1
    # Lines Ray forwards from other workers of the shared test cluster are not ours.
    lines = [line for line in result.output.strip().splitlines() if "pid=" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines

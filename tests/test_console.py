"""What users see: one `[raykit]` line per event from the driver, no Ray/transformers internals
unless `--verbose`, a progress bar on terminals, and the end-of-run table."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from raykit.runtime.console import (
    EventSender,
    RunConsole,
    dropped_stderr_lines,
    event_line,
    summary_table,
)
from tests.helpers import SAMPLE_DEV, SAMPLE_TRAIN, stale_output_dir

PROGRESS = {
    "kind": "progress",
    "step": 4,
    "total_steps": 10,
    "epoch": 0.4,
    "loss": 1.23456,
    "lr": 2e-5,
    "pairs_per_s": 31.25,
    "tokens_per_s": 1200.4,
    "mfu": 0.1234,
    "padding": 0.087,
    "eta_s": 75.0,
}
# What Ray and transformers print from workers, and what they print on the driver.
INTERNALS = (
    "(RayTrainWorker",
    "(TrainController",
    "(SplitCoordinator",
    "Execution plan",
    "Reporting training result",
    "LOAD REPORT",
    "Loading weights",
    "Writing model",
    "RayDeprecationWarning",
    "Token authentication",
    "Started a local Ray",
)


def test_event_lines_are_plain_and_parseable():
    assert event_line(PROGRESS) == (
        "step 4/10 epoch 0.40 loss 1.2346 lr 2.00e-05 pairs/s 31.2 tokens/s 1200 mfu 12.3% "
        "padding 8.7% eta 0:01:15"
    )
    evaluation = {"kind": "eval", "label": "final", "step": 10, "metrics": {"nDCG@10": 0.71234}}
    assert event_line(evaluation) == "eval final step 10: nDCG@10=0.7123"
    assert event_line({"kind": "message", "text": "hello"}) == "hello"


def test_summary_table_lines_up_before_and_after():
    table = summary_table(
        {"nDCG@10": 0.5, "AP": 0.25}, {"nDCG@10": 0.75, "AP": 0.5}, [("model", "/out")]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["nDCG@10", "AP"]
    assert lines[1].split() == ["before", "training", "0.5000", "0.2500"]
    assert lines[2].split() == ["after", "training", "0.7500", "0.5000"]
    assert lines[3].split() == ["model", "/out"]
    assert lines[1].index("0.5000") == lines[2].index("0.7500") == lines[0].index("nDCG@10")


def test_events_reach_the_driver_once_each(ray_cluster, capsys):
    """Rank 0 sends to the run's mailbox (its lock actor); the driver prints each event once, in
    order. On a terminal, progress moves the bar instead of printing lines."""
    from raykit.runtime.cluster import hold_run_lock

    mailbox = hold_run_lock(f"console-test-{uuid.uuid4().hex}", "'console test'")
    try:
        with RunConsole(mailbox, interactive=False):
            sender = EventSender(mailbox, enabled=True)
            EventSender(mailbox, enabled=False).send("message", text="from rank 1")
            sender.send("message", text="first")
            sender.send("progress", **{k: v for k, v in PROGRESS.items() if k != "kind"})
        lines = capsys.readouterr().out.splitlines()
        assert lines == ["[raykit] first", f"[raykit] {event_line(PROGRESS)}"]

        with RunConsole(mailbox, interactive=True) as console:
            sender = EventSender(mailbox, enabled=True)
            fields = {k: v for k, v in PROGRESS.items() if k != "kind"}
            for step in (4, 8):
                sender.send("progress", **{**fields, "step": step})
            sender.send("message", text="between")
        assert console.bar is not None and console.bar.n == 8 and console.bar.total == 10
        out = capsys.readouterr().out
        assert out.count("[raykit] between") == 1 and "step 8/10 epoch" not in out
    finally:
        ray_cluster.kill(mailbox)


def start_finetune(tmp_path, model: str, ray_address: str, *extra: str) -> subprocess.Popen:
    """`raykit finetune` in its own process, as a user runs it (joining the test cluster, as
    under `ray job submit`), output captured as a pipe: not a terminal."""
    args = [
        sys.executable,
        "-m",
        "raykit.cli",
        "finetune",
        "--model_name_or_path",
        model,
        "--train_data",
        str(SAMPLE_TRAIN),
        "--eval_data",
        str(SAMPLE_DEV),
        "--output_dir",
        str(tmp_path / "out"),
        "--storage_path",
        str(tmp_path / "ray"),
        "--max_steps",
        "6",
        "--logging_steps",
        "2",
        "--eval_steps",
        "3",
        "--train_group_size",
        "4",
        "--max_len",
        "64",
        *extra,
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    env.pop("RAYKIT_VERBOSE", None)
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )


def finished_output(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout + stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_finetune_prints_each_line_once_and_no_internals(ray_cluster, tiny_model_dir, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    quiet = start_finetune(tmp_path / "quiet", tiny_model_dir, address)
    # --verbose at the same time (one worker each: both fit). It also replaces a non-empty
    # output_dir (--overwrite_output_dir) whole: no stale file is left beside the export, and no
    # temporary folder beside it (test_train checks the refusal without it).
    out = stale_output_dir(tmp_path / "verbose" / "out")
    verbose = start_finetune(
        tmp_path / "verbose", tiny_model_dir, address, "--verbose", "--overwrite_output_dir"
    )
    with ThreadPoolExecutor(2) as pool:  # both pipes drained as they fill
        output, verbose_output = pool.map(finished_output, (quiet, verbose))
    lines = [line for line in output.splitlines() if line.strip()]
    assert not [line for line in lines if any(noise in line for noise in INTERNALS)], output
    repeated = [line for line, n in collections.Counter(lines).items() if n > 1]
    assert not repeated, output
    # Every event, once, in order: data, eval before, progress with ETA, evals, the table.
    raykit = [line.removeprefix("[raykit] ") for line in lines if line.startswith("[raykit] ")]
    steps = [line.split()[1] for line in raykit if line.startswith("step ")]
    assert steps == ["2/6", "4/6", "6/6"] and all(
        " eta " in line for line in raykit if line.startswith("step ")
    )
    evals = [line.split(":")[0] for line in raykit if line.startswith("eval ") and " step " in line]
    assert evals == ["eval before training step 0", "eval step 3", "eval final step 6"]
    # The data line comes first; its validation summary comes with it, or (when validation ran
    # beside training) once, at the end.
    assert raykit[0].startswith("train data: 40 ")
    assert sum(line.startswith("train data: 40 valid groups") for line in raykit) == 1
    # The end table: its header, then one row per item (Ray's own warnings, e.g. the raylet's
    # on a busy node, may still appear above it: they are at warning level).
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["nDCG@10"])
    table = [line.split()[0] for line in lines[header:]]
    assert {"before", "after", "best", "throughput", "model"} <= set(table), output

    # --verbose shows what Ray and transformers print, as before.
    assert "(RayTrainWorker" in verbose_output and "Reporting training result" in verbose_output
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "train_summary.json"} <= files
    assert not files & {"pytorch_model.bin", "notes.txt"}
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".out.")] == []


def test_score_progress_has_an_eta_when_the_row_count_is_cheap(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raykit.scoring.outputs import RunStats, count_input_rows, score_progress, update_progress

    pairs = tmp_path / "a.jsonl"
    pairs.write_text('{"query": "q", "passage": "p"}\n' * 5)
    pq.write_table(pa.table({"query": ["q"] * 3}), tmp_path / "b.parquet")
    assert count_input_rows([str(pairs), str(tmp_path / "b.parquet")]) == 8
    assert count_input_rows([str(pairs), str(tmp_path / "c.jsonl.gz")]) is None  # unknown

    progress = score_progress(2, total_rows=8)  # not a terminal: a line every 30 s
    progress.started -= 2.0
    progress.last_log -= 31
    stats = RunStats(rows_in=4, pairs_scored=4)
    update_progress(progress, stats)
    progress.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("[raykit] scored 4 pairs (2.0 pairs/s), 4/8 rows, eta 0:00:0"), line


def test_row_progress_lines_carry_rate_and_eta(capsys):
    from raykit.runtime.console import RowProgress

    progress = RowProgress(100, "mine: PairFilterScorer", every=0)
    progress.started -= 5.0
    progress.update(25)
    progress.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("[raykit] mine: PairFilterScorer: 25/100 rows (5.0/s), eta 0:00:1"), line


def test_dropped_stderr_lines_drop_only_the_lines_named(capfd):
    """What C++ code (Ray's core worker) writes to descriptor 2 passes through as it comes, but
    for whole lines holding a needle; a progress bar's carriage-return line is not held back."""
    with dropped_stderr_lines(b"NOTICE"):
        os.write(2, b"kept 1\n[core_worker.cc] an actor NOTICE here\nkept 2\n")
        os.write(2, b"bar 50%\r")
        os.write(2, b"half a line, ")
        os.write(2, b"then its end\nNOTICE without an end")
    assert capfd.readouterr().err == "kept 1\nkept 2\nbar 50%\rhalf a line, then its end\n"
    os.write(2, b"a NOTICE after the block\n")  # descriptor 2 is itself again
    assert capfd.readouterr().err == "a NOTICE after the block\n"

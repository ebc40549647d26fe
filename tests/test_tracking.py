"""`--report_to`: TensorBoard, MLflow and W&B each receive the metric series of
train_summary.json, read back with each tool's own reader (a real MLflow tracking server)."""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from raykit.config import ConfigError, FinetuneConfig, load_config, parse_report_to
from raykit.training.launch import finetune
from raykit.training.tracking import safe_key
from tests.helpers import SAMPLE_DEV, free_ports, tiny_options, wait_for


def test_report_to_values():
    assert parse_report_to(["none"]) == []
    assert parse_report_to(["tensorboard", "mlflow,wandb"]) == ["tensorboard", "mlflow", "wandb"]
    assert parse_report_to(["all"]) == ["tensorboard", "mlflow", "wandb"]
    with pytest.raises(ConfigError, match="report_to: .* got comet"):
        parse_report_to(["tensorboard", "comet"])
    with pytest.raises(ConfigError, match="report_to"):
        parse_report_to(["none", "wandb"])
    cfg = load_config(FinetuneConfig, train_data=["x"], report_to=["tensorboard"])
    assert cfg.backends == ["tensorboard"]
    assert load_config(FinetuneConfig, train_data=["x"]).backends == []


def test_tensorboard_and_mlflow_names_keep_their_meaning():
    assert safe_key("eval/nDCG@10") == "eval/nDCG_at_10"
    assert safe_key("train/pairs_per_s") == "train/pairs_per_s"


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a SQLite store and a free local port, as a team would run it."""
    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    with open(tmp_path / "mlflow.log", "w") as log:
        server = subprocess.Popen(
            [
                os.path.join(os.path.dirname(sys.executable), "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--default-artifact-root",
                str(tmp_path / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy() -> bool:
        assert server.poll() is None, (tmp_path / "mlflow.log").read_text()[-2000:]
        try:
            return httpx.get(f"{uri}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 120, "the MLflow server")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def wandb_history(run_file: str) -> list[dict]:
    """The history rows of an offline W&B run, from its `.wandb` file: a LevelDB-style log of
    `Record` protobufs (7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL or LAST ends it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def summary_series(summary: dict) -> dict[str, list[tuple[int, float]]]:
    """train_summary.json's `loss` and `eval` entries as tracker series: key -> (step, value)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for prefix, entries in (("train", summary["loss"]), ("eval", summary["eval"])):
        for entry in entries:
            for key, value in entry.items():
                if key != "step":
                    series.setdefault(f"{prefix}/{key}", []).append((entry["step"], value))
    return series


def assert_same_series(got: list, expected: list, key: str, rel: float = 1e-9) -> None:
    assert [step for step, _ in got] == [step for step, _ in expected], key
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=rel), key


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_backend_receives_the_summary_series(
    ray_cluster, tiny_model_dir, tmp_path, monkeypatch, mlflow_server
):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Set on the driver after the Ray instance started: rank 0 gets them from the driver.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "raykit-tests")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logs = tmp_path / "logs"
    options = tiny_options(
        tiny_model_dir,
        tmp_path,
        eval_data=str(SAMPLE_DEV),
        max_steps="6",
        logging_steps="2",
        eval_steps="3",
        run_name="tracked",
        logging_dir=str(logs),
    )
    cfg = load_config(FinetuneConfig, **options, report_to=["tensorboard", "mlflow", "wandb"])
    result = finetune(cfg, console=False)
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    expected = summary_series(summary)
    assert [step for step, _ in expected["train/loss"]] == [2, 4, 6]
    assert [step for step, _ in expected["eval/nDCG@10"]] == [0, 3, 6]
    assert {"train/lr", "train/pairs_per_s", "eval/AP", "eval/RR@10"} <= set(expected)

    # TensorBoard: the event files, through TensorBoard's own reader (float32 values).
    events = EventAccumulator(str(logs))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {safe_key(key) for key in expected}
    for key, series in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(safe_key(key))]
        assert_same_series(got, series, key, rel=1e-6)

    # MLflow: the server's store, through MlflowClient.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("raykit-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["max_steps"] == "6"
    assert run.data.tags["raykit.output_dir"] == result.output_dir
    for key, series in expected.items():
        history = sorted(
            client.get_metric_history(run.info.run_id, safe_key(key)), key=lambda m: m.step
        )
        assert_same_series([(m.step, m.value) for m in history], series, key)

    # W&B: the offline run's records.
    (run_file,) = glob.glob(str(logs / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wandb_history(run_file)
    for key, series in expected.items():
        assert_same_series([(row["_step"], row[key]) for row in rows if key in row], series, key)

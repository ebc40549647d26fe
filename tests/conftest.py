"""Shared fixtures: one small Ray cluster per test session and a tiny random BERT reranker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.tiny_model import ROOT, build_tiny_reranker

SAMPLE_TRAIN = ROOT / "examples" / "data" / "train.jsonl"
SAMPLE_DEV = ROOT / "examples" / "data" / "dev.jsonl"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # slow starts under load


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs it (4 logical CPUs on 2 cores)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never another cluster on this machine.
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=1_500_000_000,
            include_dashboard=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


SERVE_API_KEY = "test-secret"


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir):
    """Two apps from examples/serve.yaml's args on one Serve instance: `main` and `tight` (a
    1-request queue). Yields the base URL. Module-scoped: the replicas hold CPUs of the shared
    test cluster that later modules (scoring actors, Ray Data tasks) need."""
    from ray import serve

    from raykit.serve import app_builder

    port = free_port()
    args = serve_args(tiny_model_dir)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(args), name="main", route_prefix="/")
    tight = {**args, "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2,
             "batch_wait_timeout_s": 0.0, "cpus_per_replica": 0.5}  # fmt: skip
    serve.run(app_builder(tight), name="tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def serve_args(model: str, **extra) -> dict:
    """examples/serve.yaml's app args, small limits for the tests, and `extra`."""
    import yaml

    args = yaml.safe_load((ROOT / "examples" / "serve.yaml").read_text())["applications"][0]["args"]
    args.pop("model_name")  # clients see the default: the model folder's name
    args.update(model=model, max_len=64, max_batch_tokens=4096, max_documents=50,
                max_request_bytes=20_000, batch_wait_timeout_s=0.05, api_key=SERVE_API_KEY,
                max_replicas=1)  # fmt: skip
    return {**args, **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer random BERT with one output logit and a WordPiece tokenizer trained here."""
    return build_tiny_reranker(tmp_path_factory.mktemp("tiny-bert"))


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as they are)."""
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path

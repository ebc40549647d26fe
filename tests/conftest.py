"""Shared fixtures and helpers: one small Ray cluster per test session, a tiny random BERT
reranker, Serve apps, and the waiting, port and process helpers the Ray tests use.

Markers (see pyproject.toml): `slow` (tens of seconds or more), `cluster` (starts its own Ray
cluster with `ray start`), `fault` (kills a process on purpose). `pytest -m "not slow"` is the
inner loop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_model import ROOT, build_tiny_reranker

SAMPLE_TRAIN = ROOT / "examples" / "data" / "train.jsonl"
SAMPLE_DEV = ROOT / "examples" / "data" / "dev.jsonl"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # slow starts under load
# Ray Train's controller acts on reports, finished and dead workers at each poll (every 2 s by
# default); a tiny run is mostly such waits. Nodes and workers started by the tests inherit this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one actor less per run
SERVE_MODULES = ("test_abuse.py", "test_serve.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Serve modules last: they share one session-wide Serve app (`served`), whose
    replicas keep CPUs of the test cluster that the other modules' Ray Data and Train work needs."""
    items.sort(key=lambda item: item.path.name in SERVE_MODULES)  # stable: order kept otherwise


@pytest.fixture(scope="session", autouse=True)
def raykit_console():
    """`[raykit]` lines on stdout, as the CLI sets up (tests read them with capsys)."""
    from raykit.console import setup_console

    setup_console(verbose=True)


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


@pytest.fixture(scope="session")
def served(ray_cluster, tiny_model_dir):
    """Two apps from examples/serve.yaml's args on one Serve instance: `main` and `tight` (a
    1-request queue). Yields the base URL. Started once, by the Serve modules, which run last
    (see `pytest_collection_modifyitems`)."""
    from ray import serve

    from raykit.serve import app_builder

    (port,) = free_ports(1)
    args = serve_args(tiny_model_dir)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(args), name="main", route_prefix="/")
    tight = {**args, "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2,
             "batch_wait_timeout_s": 0.0, "cpus_per_replica": 0.5}  # fmt: skip
    serve.run(app_builder(tight), name="tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def serve_args(model: str, **extra) -> dict:
    """examples/serve.yaml's app args, small limits for the tests, and `extra`. Replicas do not
    compile (test_serve has one that does, on the defaults)."""
    import yaml

    args = yaml.safe_load((ROOT / "examples" / "serve.yaml").read_text())["applications"][0]["args"]
    args.pop("model_name")  # clients see the default: the model folder's name
    args.update(model=model, max_len=64, max_batch_tokens=4096, max_documents=50,
                max_request_bytes=20_000, batch_wait_timeout_s=0.05, api_key=SERVE_API_KEY,
                max_replicas=1, compile="off")  # fmt: skip
    return {**args, **extra}


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


def marked_train_file(tmp_path: Path, source: Path = SAMPLE_TRAIN) -> Path:
    """The sample groups with a marker on every positive: a signal a random 2-layer BERT can
    learn in a few dozen steps, so a falling loss shows that the loop really optimises."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    for row in rows:
        row["pos"] = [f"yes, this answers it: {p}" for p in row["pos"]]
        row["neg"] = [f"no: {n}" for n in row["neg"]]
    return write_jsonl(tmp_path / f"marked-{source.name}", rows)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together, so never the same one)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def processes_mentioning(text: str) -> list[int]:
    """Pids (not this process) whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(entry.name))
    return pids


def stop_processes_mentioning(text: str) -> None:
    """Stop one Ray cluster's processes (`ray stop` would also stop the tests' own cluster)."""
    for pid in processes_mentioning(text):  # a test cluster keeps nothing worth a clean stop
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not processes_mentioning(text), 10, "processes to exit", 0.2)


def orphaned_ray_processes(existing: set[int]) -> list[int]:
    """Ray processes (not in `existing`) whose parent is gone: agents of a node started with
    `ray start` outlive its raylet, and rewrite their command line and environment, so neither
    names their cluster."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in existing:
            continue
        with contextlib.suppress(OSError):
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().decode(errors="ignore")
            ray_process = command.startswith("ray::") or "/ray/" in command
            if ray_process and "\nPPid:\t1\n" in status:
                pids.append(int(entry.name))
    return pids


def running_pids() -> set[int]:
    return {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}


def actor_pids(class_name: str) -> list[int]:
    """Pids of the live actors of one class in the tests' Ray cluster, from Ray's own actor
    table (no process-name matching: every Ray worker process looks alike to `ps`)."""
    import ray

    table = ray._private.state.actors()  # GCS actor table; the state API needs a dashboard
    alive = [a for a in table.values() if a["State"] == "ALIVE" and a.get("Pid")]
    return [int(a["Pid"]) for a in alive if class_name in a["ActorClassName"]]


def plain_hf_logits(model: Any, pairs: list[list[str]], max_len: int = 64) -> list[float]:
    """The reference every scoring path must equal at fp32: one padded batch through a plain
    Hugging Face forward pass (`model` is a folder or a loaded model with `name_or_path`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(model, str):
        model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    batch = tokenizer(queries, passages, padding=True, truncation="only_second",
                      max_length=max_len, return_tensors="pt")  # fmt: skip
    with torch.inference_mode():
        return model.eval()(**batch).logits.view(-1).tolist()

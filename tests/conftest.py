"""Shared fixtures: one small Ray cluster per test session, a tiny random BERT reranker and the
Serve apps; helpers live in `tests/helpers.py`.

Two tiers (markers in pyproject.toml): `unit` tests start no Ray and no server and take seconds;
`integration` tests use Ray (the `ray_cluster`, `served` or `cluster` fixtures) or a server.
Both are set here from what a test uses; an integration test is also `slow`, so
`pytest -m "not slow"` (or `-m unit`) is the inner loop, and a unit test that starts Ray fails."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid

import pytest

from tests.helpers import build_tiny_reranker, free_ports, serve_args, stop_processes_with_env

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Every process of the session's Ray instance inherits this, so none outlives the session.
SESSION_MARK = ("RAYKIT_TEST_SESSION", uuid.uuid4().hex)
os.environ[SESSION_MARK[0]] = SESSION_MARK[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # slow starts under load
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one actor less per run
# Compiled models the tests make go to a folder of their own, not the user's ~/.cache, and so
# does inductor's cache: every run compiles from scratch, as on a fresh CI machine (a warm
# /tmp/torchinductor_$USER made compile tests here up to 2.6x faster than there).
SESSION_CACHES = [
    os.environ.setdefault(variable, tempfile.mkdtemp(prefix=prefix))
    for variable, prefix in (
        ("RAYKIT_CACHE", "raykit-test-cache-"),
        ("TORCHINDUCTOR_CACHE_DIR", "raykit-test-inductor-"),
    )
    if variable not in os.environ
]
SERVE_MODULES = ("test_abuse.py", "test_serve.py", "test_serve_ops.py")


RAY_FIXTURES = {"ray_cluster", "served", "cluster"}


def pytest_sessionfinish() -> None:
    """The session's own caches go with it (a cache the user set is left alone)."""
    for folder in SESSION_CACHES:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test unit or integration (and integration tests slow). Unit tests run first,
    before any Ray instance exists, so one that starts Ray is caught; the Serve modules run
    last: their session-wide app (`served`) keeps CPUs that Ray Data and Train work needs."""
    for item in items:
        integration = bool(RAY_FIXTURES & set(item.fixturenames))
        integration = integration or item.get_closest_marker("integration") is not None
        item.add_marker(pytest.mark.integration if integration else pytest.mark.unit)
        if integration:
            item.add_marker(pytest.mark.slow)
    items.sort(
        key=lambda item: (item.get_closest_marker("unit") is None, item.path.name in SERVE_MODULES)
    )


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """A unit test that starts Ray fails (and its instance is stopped): it is an integration
    test, and should take the `ray_cluster` fixture."""
    unit = request.node.get_closest_marker("unit") is not None
    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if unit and not before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
        pytest.fail("a unit test started Ray: give it the ray_cluster fixture")


@pytest.fixture(scope="session", autouse=True)
def raykit_console():
    """`[raykit]` lines on stdout, as the CLI sets up (tests read them with capsys)."""
    from raykit.runtime.console import setup_console

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
    # A worker can outlive `ray.shutdown()` (a Train controller whose driver a test killed did,
    # idle, until killed): stop whatever of the session is left.
    stop_processes_with_env(*SESSION_MARK)


@pytest.fixture(scope="session")
def served(ray_cluster, tiny_model_dir):
    """Two apps from examples/serve.yaml's args on one Serve instance: `main` and `tight` (a
    1-request queue). Yields the base URL. Started once, by the Serve modules, which run last
    (see `pytest_collection_modifyitems`)."""
    from ray import serve

    from raykit.serving.app import app_builder

    (port,) = free_ports(1)
    args = serve_args(tiny_model_dir)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(args), name="main", route_prefix="/")
    tight = {
        **args,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
        "retry_after_s": 2,
        "batch_wait_timeout_s": 0.0,
        "cpus_per_replica": 0.5,
    }
    serve.run(app_builder(tight), name="tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer random BERT with one output logit and a WordPiece tokenizer trained here."""
    return build_tiny_reranker(tmp_path_factory.mktemp("tiny-bert"))

"""Serving in production on the tiny models: several models behind one endpoint, a rollout
under load with no failed request, autoscaling up and down, and /health following the model
replicas. Each app has its own route prefix on the session's Serve instance (`served`)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from raykit.config import ConfigError, ServeConfig
from raykit.core.reranker import Reranker
from raykit.core.served import model_revision
from tests.helpers import SERVE_API_KEY, build_tiny_reranker, serve_args, wait_for

HEADERS = {"Authorization": f"Bearer {SERVE_API_KEY}"}
QUERY = "When is the best time to plant tulip bulbs?"
DOCS = [
    "Plant tulip bulbs in autumn, a few weeks before the ground freezes.",
    "Tulips were so valuable in the 1630s that single bulbs sold for the price of a house.",
    "Beginners do well with three runs a week and a rest day between them.",
]


def raw_scores(model: str) -> np.ndarray:
    return np.array(
        Reranker(model, device="cpu", max_length=64).compute_score([[QUERY, d] for d in DOCS])
    )


def tei(url: str, **extra) -> httpx.Response:
    body = {"query": QUERY, "texts": DOCS, "raw_scores": True, **extra}
    return httpx.post(url + "/rerank", json=body, headers=HEADERS, timeout=60)


def by_index(reply: httpx.Response) -> np.ndarray:
    scores = {r["index"]: r["score"] for r in reply.json()}
    return np.array([scores[i] for i in range(len(DOCS))])


def info(url: str, **params) -> dict:
    return httpx.get(url + "/info", headers=HEADERS, params=params, timeout=60).json()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    """A second tiny reranker (other weights): model B of the rollout, `b` of the pair."""
    return build_tiny_reranker(tmp_path_factory.mktemp("other-bert"), seed=1)


@pytest.fixture(scope="module")
def two_models(served, tiny_model_dir, other_model):
    """An app serving `a` (the default) and `b`: its URL."""
    from ray import serve

    from raykit.serving.app import app_builder

    args = serve_args([f"a={tiny_model_dir}", f"b={other_model}"], cpus_per_replica=0.25)
    serve.run(app_builder(args), name="two", route_prefix="/two")
    yield served + "/two"
    serve.delete("two")


def test_two_models_behind_one_endpoint_route_on_the_model_field(
    two_models, tiny_model_dir, other_model
):
    a, b = raw_scores(tiny_model_dir), raw_scores(other_model)
    assert np.abs(a - b).max() > 1e-3  # two models that score apart
    listed = httpx.get(two_models + "/v1/models", headers=HEADERS).json()
    assert [(m["id"], m["default"]) for m in listed["data"]] == [("a", True), ("b", False)]
    np.testing.assert_allclose(by_index(tei(two_models, model="b")), b, atol=1e-5)
    np.testing.assert_allclose(by_index(tei(two_models, model="a")), a, atol=1e-5)
    np.testing.assert_allclose(by_index(tei(two_models)), a, atol=1e-5)  # the default
    cohere = httpx.post(
        two_models + "/v1/rerank",
        json={"query": QUERY, "documents": DOCS, "model": "b"},
        headers=HEADERS,
    ).json()
    assert cohere["model"] == "b"
    relevance = {r["index"]: r["relevance_score"] for r in cohere["results"]}
    np.testing.assert_allclose([relevance[i] for i in range(3)], 1 / (1 + np.exp(-b)), atol=1e-5)
    unknown = tei(two_models, model="c")
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "model: 'c' is not served here; served: a, b"}
    status = info(two_models, model="b")
    assert status["model_name"] == "b" and status["replicas"] == 2
    revisions = {m["name"]: m["revision"] for m in status["models"]}
    assert revisions == {"a": model_revision(tiny_model_dir), "b": model_revision(other_model)}
    assert tiny_model_dir not in str(status) and "source" not in status


def test_health_follows_the_model_replicas_and_liveness_does_not(two_models):
    """Kill `b`'s replica: readiness turns 503 (Serve's controller sees it gone) and 200 again
    when Serve has replaced it; liveness answers 200 throughout, without auth."""
    import ray

    assert httpx.get(two_models + "/health").status_code == 200
    names = ray.util.list_named_actors(all_namespaces=True)
    (replica,) = [n["name"] for n in names if "two#reranker_model_b" in n["name"]]
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    seen, live = [], []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        reply = httpx.get(two_models + "/health", timeout=10)
        seen.append(reply.status_code)
        live.append(httpx.get(two_models + "/live", timeout=10).status_code)
        if 503 in seen and seen[-1] == 200:
            break
        time.sleep(0.2)
    assert 503 in seen and seen[-1] == 200, Counter(seen)
    assert set(live) == {200}
    assert reply.json() == {"status": "ok"}


@pytest.mark.timeout(420)
def test_rollout_under_load_fails_no_request_and_answers_wholly_a_or_b(
    served, tiny_model_dir, other_model
):
    """Four clients send requests while `raykit serve --rollout` switches A -> B: every reply
    is 200 and wholly A's or wholly B's scores, and once the rollout returns all are B's."""
    from ray import serve

    from raykit.serving.app import app_builder
    from raykit.serving.rollout import run_rollout

    args = serve_args(tiny_model_dir, cpus_per_replica=0.25, route_prefix="/roll", app_name="roll")
    serve.run(app_builder(args), name="roll", route_prefix="/roll")
    url = served + "/roll"
    a, b = raw_scores(tiny_model_dir), raw_scores(other_model)
    replies: list[tuple[float, int, np.ndarray | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                reply = http.post(
                    url + "/rerank",
                    json={"query": QUERY, "texts": DOCS, "raw_scores": True},
                    headers=HEADERS,
                )
                scores = by_index(reply) if reply.status_code == 200 else None
                replies.append((time.monotonic(), reply.status_code, scores))

    clients = [threading.Thread(target=client) for _ in range(4)]
    try:
        for thread in clients:
            thread.start()
        wait_for(lambda: len(replies) > 20, 60, "steady traffic")
        with pytest.raises(ConfigError, match="not served by 'roll'"):
            run_rollout(ServeConfig(model=[f"other={other_model}"], app_name="roll", rollout=True))
        run_rollout(ServeConfig(model=[other_model], app_name="roll", rollout=True))
        switched = time.monotonic()
        # Replies that left before the switch may land in its first 0.5 s: count only later ones.
        wait_for(lambda: sum(t > switched + 0.5 for t, _, _ in replies) > 20, 60, "traffic after")
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        serve.delete("roll")
    assert {status for _, status, _ in replies} == {200}
    whose = ["a" if np.abs(s - a).max() < 1e-5 else "b" if np.abs(s - b).max() < 1e-5 else "?"
             for _, _, s in replies]  # fmt: skip
    assert "?" not in whose and whose[0] == "a" and "b" in whose
    after = [w for (t, _, _), w in zip(replies, whose, strict=True) if t > switched + 0.5]
    assert after and set(after) == {"b"}


def running_replicas(app: str, model: str) -> int:
    """Model replicas running now, from Serve's controller (as /health reads them): asking the
    model itself would wake one that was scaled to zero."""
    from raykit.core.served import parse_models
    from raykit.serving.status import ReplicaStatus

    deployments = [m.deployment for m in parse_models([model])]
    return sum(r.running for r in ReplicaStatus(app, deployments)._fetch().values())


@pytest.mark.timeout(420)
def test_autoscaling_adds_a_replica_under_load_and_scales_to_zero_when_idle(
    served, tmp_path_factory
):
    """min_replicas 0: 1 -> 2 replicas under 8 clients, 0 when they stop (/health stays 200),
    and the next request starts one again; no request fails."""
    from ray import serve
    from ray.serve._private.api import _get_global_client

    from raykit.serving.app import DRAIN_POLL_S, app_builder

    wide = build_tiny_reranker(tmp_path_factory.mktemp("wide"), hidden_size=128, layers=4)
    args = serve_args(
        wide,
        min_replicas=0,
        max_replicas=2,
        cpus_per_replica=0.25,
        target_ongoing_requests=1,
        upscale_delay_s=0,
        downscale_delay_s=2,
        look_back_period_s=2,
    )
    serve.run(app_builder(args), name="elastic", route_prefix="/elastic")
    url = served + "/elastic"
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                body = {"query": QUERY, "texts": [f"{d} {i}" for i in range(8) for d in DOCS]}
                statuses.append(http.post(url + "/rerank", json=body, headers=HEADERS).status_code)

    clients = [threading.Thread(target=client) for _ in range(8)]
    try:
        assert info(url)["replicas"] == 1  # deployed with one, ready to serve
        # A stopping replica looks for requests in flight every DRAIN_POLL_S, not Serve's 2 s.
        details = _get_global_client().get_serve_details()["applications"]["elastic"]
        polls = {
            d["deployment_config"]["graceful_shutdown_wait_loop_s"]
            for d in details["deployments"].values()
        }
        assert polls == {DRAIN_POLL_S}
        for thread in clients:
            thread.start()
        wait_for(lambda: info(url)["replicas"] == 2, 120, "a second replica under load")
        stop.set()
        for thread in clients:
            thread.join()
        wait_for(lambda: running_replicas("elastic", wide) == 0, 120, "scaled to zero", 1)
        assert httpx.get(url + "/health").status_code == 200  # none on purpose: still ready
        woken = tei(url)  # waits for Serve to start a replica
        assert woken.status_code == 200 and len(woken.json()) == len(DOCS)
        assert running_replicas("elastic", wide) == 1
    finally:
        stop.set()
        serve.delete("elastic")
    assert statuses and set(statuses) == {200}, Counter(statuses)


@pytest.mark.timeout(300)
def test_a_serve_config_file_rolls_out_a_checkpoint_in_place(served, tiny_model_dir, other_model):
    """`serve deploy` of a config whose model deployment has a new `user_config` swaps the
    checkpoint in the running replica (no new replica) and answers throughout."""
    import ray
    from ray.serve._private.api import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from raykit.core.served import parse_models

    (model,) = parse_models([tiny_model_dir])
    app = {
        "name": "declared",
        "route_prefix": "/declared",
        "import_path": "raykit.serving:app_builder",
        "args": serve_args(tiny_model_dir, cpus_per_replica=0.25),
    }
    client = _get_global_client()
    url = served + "/declared"
    a, b = raw_scores(tiny_model_dir), raw_scores(other_model)

    def replica_actors() -> list[str]:
        names = ray.util.list_named_actors(all_namespaces=True)
        return [n["name"] for n in names if f"declared#{model.deployment}" in n["name"]]

    try:
        client.deploy_apps(ServeDeploySchema(applications=[app]), _blocking=True)
        np.testing.assert_allclose(by_index(tei(url)), a, atol=1e-5)
        before = replica_actors()
        rollout = {**app, "deployments": [{"name": model.deployment,
                                           "user_config": {"model": other_model}}]}  # fmt: skip
        client.deploy_apps(ServeDeploySchema(applications=[rollout]))
        statuses = []

        def serves_b() -> bool:
            reply = tei(url)
            statuses.append(reply.status_code)
            return reply.status_code == 200 and np.abs(by_index(reply) - b).max() < 1e-5

        wait_for(serves_b, 120, "the new checkpoint's scores")
        assert set(statuses) == {200}, Counter(statuses)
        assert replica_actors() == before  # swapped in place, not replaced
        assert info(url)["revision"] == model_revision(other_model)
    finally:
        client.delete_apps(["declared"], blocking=True)


def test_an_app_added_to_a_running_serve_names_the_proxy_it_joined(served, tiny_model_dir, caplog):
    """`raykit serve --detach` on a cluster whose Serve already runs: its app is behind that
    proxy, whatever --host/--port say; the address it prints is the proxy's (and it says why)."""
    import logging

    from raykit.serving.app import proxy_address

    host, port = served.removeprefix("http://").split(":")
    with caplog.at_level(logging.WARNING, logger="raykit"):
        joined = proxy_address(ServeConfig(model=[tiny_model_dir], port=int(port) + 1))
    assert joined == (host, int(port))
    assert f"its proxy at {host}:{port}: --host 127.0.0.1 --port {int(port) + 1} are ignored" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raykit"):
        assert proxy_address(ServeConfig(model=[tiny_model_dir], port=int(port))) == joined
    assert not caplog.records


def test_detach_refuses_a_local_instance_that_would_stop_with_the_command(
    tiny_model_dir, monkeypatch
):
    """`--detach` leaves the app on a running cluster; with none to join, the local instance
    the command started would stop when it returns, taking the app with it: one line, and
    the instance is shut down."""
    import ray

    from raykit.runtime import cluster
    from raykit.serving.app import run_serve

    monkeypatch.setattr(cluster, "init_ray", lambda cpus=0: True)  # "started a local instance"
    shut = []
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    with pytest.raises(ConfigError, match="detach: no running Ray cluster to leave the app on"):
        run_serve(ServeConfig(model=[tiny_model_dir], detach=True))
    assert shut == [True]

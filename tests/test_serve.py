"""The Ray Serve endpoint on the tiny model: both API shapes, limits, auth, batching, Cohere."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from raykit.config import ConfigError, ServeConfig
from raykit.core.reranker import Reranker
from tests.helpers import SERVE_API_KEY, serve_args, wait_for

API_KEY = SERVE_API_KEY
QUERY = "When is the best time to plant tulip bulbs?"
DOCS = [
    "Plant tulip bulbs in autumn, a few weeks before the ground freezes.",
    "Tulips were so valuable in the 1630s that single bulbs sold for the price of a house.",
    "Beginners do well with three runs a week and a rest day between them.",
]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def slow_app(served, tmp_path_factory):
    """A third app with a wider model, so that a big request takes seconds: its URL."""
    from ray import serve

    from raykit.serving.app import app_builder
    from tests.helpers import build_tiny_reranker

    wide = build_tiny_reranker(tmp_path_factory.mktemp("wide-bert"), hidden_size=256, layers=4)
    args = serve_args(
        wide,
        max_documents=2000,
        max_request_bytes=4_000_000,
        max_batch_size=16,
        max_batch_tokens=1024,
        cpus_per_replica=0.5,
    )
    serve.run(app_builder(args), name="slow", route_prefix="/slow")
    yield served + "/slow"
    serve.delete("slow")


def post(
    url: str, path: str, body, key: str | None = API_KEY, timeout: float = 60, **kwargs
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout, **kwargs)


def test_both_api_shapes_match_reranker(served, tiny_model_dir):
    reranker = Reranker(tiny_model_dir, device="cpu", max_length=64)
    raw = reranker.compute_score([[QUERY, d] for d in DOCS])
    probs = reranker.compute_score([[QUERY, d] for d in DOCS], normalize=True)
    for path in ("/v1/rerank", "/v2/rerank"):
        body = {
            "query": QUERY,
            "documents": [DOCS[0], {"text": DOCS[1]}, DOCS[2]],
            "top_n": 2,
            "return_documents": True,
        }
        reply = post(served, path, body)
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        best = sorted(range(3), key=lambda i: -probs[i])[:2]
        assert [r["index"] for r in results] == best
        for r in results:
            assert r["relevance_score"] == pytest.approx(probs[r["index"]], abs=1e-4)
            assert r["document"] == {"text": DOCS[r["index"]]}
        assert reply.json()["meta"]["tokens"]["input_tokens"] > 0
    plain = post(served, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()["results"]
    assert len(plain) == 3 and "document" not in plain[0]
    tei = post(
        served, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}
    ).json()
    assert [t["index"] for t in tei] == sorted(range(3), key=lambda i: -raw[i])
    for t in tei:
        assert (
            t["score"] == pytest.approx(raw[t["index"]], abs=1e-4) and t["text"] == DOCS[t["index"]]
        )
    tei = post(served, "/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert {t["index"]: round(t["score"], 4) for t in tei} == {
        i: round(p, 4) for i, p in enumerate(probs)
    }
    assert "text" not in tei[0]


def test_errors_and_limits(served):
    def status(path, body, **kw):
        return post(served, path, body, **kw).status_code

    assert status("/v1/rerank", {"query": QUERY, "documents": []}) == 400
    reply = post(served, "/v1/rerank", {"query": QUERY, "documents": "not a list"})
    assert reply.status_code == 422 and "documents" in reply.text and "Traceback" not in reply.text
    reply = httpx.post(
        served + "/v1/rerank",
        content=b"{not json",
        timeout=30,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert reply.status_code == 422
    assert status("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}) == 422
    form = {
        "Authorization": f"Bearer {API_KEY}",  # what plain `curl -d '{...}'` sends
        "Content-Type": "application/x-www-form-urlencoded",
    }
    body = json.dumps({"query": QUERY, "documents": DOCS})
    reply = httpx.post(served + "/v1/rerank", content=body, headers=form)
    assert reply.status_code == 200 and len(reply.json()["results"]) == 3
    assert status("/v1/rerank", {"query": QUERY, "documents": ["d"] * 51}) == 413
    assert status("/rerank", {"query": QUERY, "texts": ["x" * 500] * 45}) == 413  # > 20,000 bytes
    long_doc = " ".join(["tulip"] * 5000)  # far over max_len: truncated, not rejected
    reply = post(served, "/v1/rerank", {"query": QUERY, "documents": [long_doc[:19000]]})
    assert reply.status_code == 200 and reply.json()["meta"]["tokens"]["input_tokens"] <= 64


def test_api_key_is_required_except_on_health(served):
    assert httpx.get(served + "/health").status_code == 200
    assert (
        post(served, "/v1/rerank", {"query": QUERY, "documents": DOCS}, key=None).status_code == 401
    )
    assert post(served, "/rerank", {"query": QUERY, "texts": DOCS}, key="wrong").status_code == 401
    assert httpx.get(served + "/info").status_code == 401
    info = httpx.get(served + "/info", headers=HEADERS).json()
    assert info["max_len"] == 64 and info["auth"] is True and "api_key" not in info
    # auto on CPU is fp32; the replica reports how much of its forward passes was padding.
    assert info["dtype"] == "float32" and info["dtype_requested"] == "auto"
    assert 0 <= info["replica_stats"]["padding_ratio"] < 1
    metrics = httpx.get(served + "/metrics", headers=HEADERS)
    assert 'raykit_requests_total{route="/info",status="401"}' in metrics.text
    assert 'raykit_requests_total{route="/v1/rerank",status="401"}' in metrics.text


def test_concurrent_requests_share_forward_passes(served):
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def forward_passes() -> int:
        return httpx.get(served + "/info", headers=headers).json()["replica_stats"][
            "forward_passes"
        ]

    async def fire(n: int) -> list[int]:
        async with httpx.AsyncClient(timeout=60, headers=headers) as client:
            bodies = [{"query": f"{QUERY} {i}", "documents": DOCS} for i in range(n)]
            replies = await asyncio.gather(
                *(client.post(served + "/v1/rerank", json=body) for body in bodies)
            )
        return [r.status_code for r in replies]

    before = forward_passes()
    assert asyncio.run(fire(16)) == [200] * 16
    used = forward_passes() - before
    assert 1 <= used < 16, f"16 concurrent requests took {used} forward passes"


def test_overload_gets_429_with_retry_after(served):
    async def flood() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(timeout=120, headers=headers) as client:
            body = {"query": QUERY, "documents": DOCS * 16}
            return await asyncio.gather(
                *(client.post(served + "/tight/v1/rerank", json=body) for _ in range(12))
            )

    replies = asyncio.run(flood())
    codes = sorted(r.status_code for r in replies)
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    rejected = next(r for r in replies if r.status_code == 429)
    assert rejected.headers["retry-after"] == "2"
    assert "queued" in rejected.json()["detail"]  # JSON like every other error


def test_official_cohere_client_works_unchanged(served, tiny_model_dir):
    import cohere

    client = cohere.ClientV2(api_key=API_KEY, base_url=served)
    response = client.rerank(model="raykit", query=QUERY, documents=DOCS, top_n=2)
    probs = Reranker(tiny_model_dir, device="cpu", max_length=64).compute_score(
        [[QUERY, d] for d in DOCS], normalize=True
    )
    best = sorted(range(3), key=lambda i: -probs[i])[:2]
    assert [r.index for r in response.results] == best
    for result in response.results:
        assert result.relevance_score == pytest.approx(probs[result.index], abs=1e-4)


@pytest.mark.slow
def test_health_waits_for_a_compiling_replica_that_then_scores_like_reranker(
    served, tiny_model_dir
):
    """The default on CPU: the replica compiles its model before serving. Meanwhile the proxy
    already routes to the ingress, whose /health answers a JSON 503 until a model replica does;
    then the compiled replica's scores equal `Reranker`'s (eager)."""
    from ray import serve

    from raykit.serving.app import app_builder
    from raykit.serving.status import STATUS_TTL_S

    app = app_builder(serve_args(tiny_model_dir, cpus_per_replica=0.5, compile="auto"))
    deploy = threading.Thread(
        target=serve.run, args=(app,), kwargs={"name": "compiled", "route_prefix": "/compiled"}
    )
    deploy.start()
    statuses = []
    try:
        while deploy.is_alive():
            reply = httpx.get(served + "/compiled/health", timeout=30)
            if reply.status_code == 503:
                assert reply.json() == {"detail": "the model is loading"}
                assert reply.headers["retry-after"] == "1"
            statuses.append(reply.status_code)
            time.sleep(0.2)
        deploy.join()
        assert 503 in statuses and 200 not in statuses[: statuses.index(503)], statuses
        # /health reads the controller's replica states cached for STATUS_TTL_S: within that
        # of serve.run returning it may still say 503, never after.
        time.sleep(STATUS_TTL_S + 0.5)
        assert httpx.get(served + "/compiled/health").status_code == 200
        info = httpx.get(served + "/compiled/info", headers={"Authorization": f"Bearer {API_KEY}"})
        assert info.json()["compiled"] is True and info.json()["compile"] == "auto"
        raw = Reranker(tiny_model_dir, device="cpu", max_length=64).compute_score(
            [[QUERY, d] for d in DOCS]
        )
        tei = post(served, "/compiled/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True})
        assert tei.status_code == 200, tei.text
        for t in tei.json():
            assert t["score"] == pytest.approx(raw[t["index"]], abs=1e-5)
    finally:
        deploy.join()
        serve.delete("compiled")


def test_serve_config_validation():
    with pytest.raises(ConfigError, match="min_replicas"):
        ServeConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        ServeConfig(max_len=512, max_batch_tokens=256)
    with pytest.raises(ConfigError, match="compile: expected auto, on or off, got 'yes'"):
        ServeConfig(compile="yes")
    # auto compiles on CPU only, and not torchao's int8 kernels; on/off are obeyed anywhere.
    assert ServeConfig().compiles("cpu") and not ServeConfig().compiles("cuda")
    assert not ServeConfig(dtype="int8").compiles("cpu")
    assert ServeConfig(compile="on").compiles("cuda")
    assert not ServeConfig(compile="off").compiles("cpu")


def test_model_name_never_shows_the_server_path(served, tiny_model_dir):
    reply = post(served, "/v1/rerank", {"query": QUERY, "documents": DOCS})
    assert reply.json()["model"] == os.path.basename(tiny_model_dir)
    info = httpx.get(served + "/info", headers=HEADERS).text
    assert tiny_model_dir not in info and tiny_model_dir not in reply.text
    named = post(served, "/v1/rerank", {"query": QUERY, "documents": DOCS, "model": "mine"})
    assert named.json()["model"] == "mine"  # the client's own name is echoed


def test_max_tokens_per_doc_and_tei_truncate_are_honoured(served, tiny_model_dir):
    long_doc = "tulip bulbs " * 40
    body = {"query": QUERY, "documents": [long_doc, DOCS[0]]}
    full = post(served, "/v1/rerank", body).json()
    cut = post(served, "/v1/rerank", {**body, "max_tokens_per_doc": 4}).json()
    assert cut["meta"]["tokens"]["input_tokens"] < full["meta"]["tokens"]["input_tokens"]
    reranker = Reranker(tiny_model_dir, device="cpu", max_length=64)
    # The document cut to its first 4 tokens scores like that prefix sent whole.
    prefix = reranker.compute_score([QUERY, "tulip bulbs tulip bulbs"], normalize=True)
    by_index = {r["index"]: r["relevance_score"] for r in cut["results"]}
    assert by_index[0] == pytest.approx(prefix, abs=1e-4)

    refused = post(
        served, "/rerank", {"query": QUERY, "texts": [DOCS[0], long_doc], "truncate": False}
    )
    assert refused.status_code == 413 and "texts[1]" in refused.json()["detail"]
    for truncate in (True, None):
        body = {"query": QUERY, "texts": [long_doc]}
        if truncate is not None:
            body["truncate"] = truncate
        assert post(served, "/rerank", body).status_code == 200
    assert post(served, "/rerank", {"query": QUERY, "texts": DOCS, "truncate": False}).is_success


def replica_stats(app: str) -> dict:
    return httpx.get(app + "/info", headers=HEADERS, timeout=60).json()["replica_stats"]


def scoring_rate(app: str, before: dict) -> tuple[dict, float]:
    """Wait until the replica has scored pairs beyond `before`, then measure its pairs/s over
    the next stretch: (the stats at the end, pairs/s)."""
    first = wait_for(
        lambda: (now := replica_stats(app))["pairs_scored"] > before["pairs_scored"] and now,
        120,
        "the replica to start scoring",
        interval=0.05,
    )
    started = time.perf_counter()
    last = wait_for(
        lambda: (now := replica_stats(app))["pairs_scored"] >= first["pairs_scored"] + 64 and now,
        120,
        "64 more pairs scored",
        interval=0.05,
    )
    return last, (last["pairs_scored"] - first["pairs_scored"]) / (time.perf_counter() - started)


def send_raw_request(app: str, path: str, body: dict) -> socket.socket:
    """POST `body` on a raw socket, so the test decides when the client goes away."""
    url = httpx.URL(app + path)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((url.host, url.port), timeout=60)
    head = (
        f"POST {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.host}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.slow
def test_cancelled_request_is_dropped_and_does_not_delay_the_next(slow_app):
    """A 1,500-document request to the slow app, abandoned by its client while it is being
    scored: its unscored pairs are dropped, and a 1-document request sent right after is
    answered in well under the time the rest of the big request would have taken."""
    before = replica_stats(slow_app)
    big = {"query": QUERY, "documents": [f"{d} {i}" for i in range(500) for d in DOCS]}
    sock = send_raw_request(slow_app, "/v1/rerank", big)
    during, rate = scoring_rate(slow_app, before)
    sock.close()  # the client goes away mid-request
    abandoned = time.perf_counter()
    small = post(slow_app, "/v1/rerank", {"query": QUERY, "documents": DOCS[:1]})
    waited = time.perf_counter() - abandoned
    assert small.status_code == 200
    left = 1500 - (during["pairs_scored"] - before["pairs_scored"])
    assert waited < 0.5 * left / rate, (waited, left, rate)
    after = wait_for(
        lambda: (now := replica_stats(slow_app))["queued_requests"] == 0 and now,
        60,
        "the queue to empty",
    )
    dropped = after["pairs_dropped"] - before["pairs_dropped"]
    scored = after["pairs_scored"] - before["pairs_scored"]
    assert dropped > 0 and scored < 1500, (dropped, scored)
    assert dropped + scored == 1501


@pytest.mark.slow
@pytest.mark.fault
def test_request_lost_with_a_killed_replica_is_retried_on_its_replacement(slow_app):
    """The replica is killed while it scores a request: the ingress sends the request again,
    Serve's replacement replica scores it, and the client gets every document's score."""
    import ray

    def replica() -> tuple[str, int]:
        names = ray.util.list_named_actors(all_namespaces=True)
        (name,) = [n["name"] for n in names if "slow#reranker_model" in n["name"]]
        return name, ray.get_actor(name, namespace="serve")._actor_id.hex()

    name, killed = replica()
    before = replica_stats(slow_app)
    big = {"query": QUERY, "documents": [f"{d} {i}" for i in range(300) for d in DOCS]}
    reply: dict = {}

    def send() -> None:
        reply["r"] = post(slow_app, "/v1/rerank", big, timeout=300)

    sender = threading.Thread(target=send)
    sender.start()
    scoring_rate(slow_app, before)  # the request is in the replica
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    sender.join(timeout=300)
    response = reply["r"]
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == len(big["documents"])
    assert replica()[1] != killed  # answered by the replacement, so the request was retried


# ---------------------------------------------------------------------------- the batch queue


@pytest.mark.slow
def test_a_decoder_reranker_serves_the_same_routes(served, tmp_path):
    """A Qwen3-style causal LM behind the same app: Cohere and TEI routes, Reranker's scores
    (which test_decoder.py pins to the model card's formula)."""
    from ray import serve

    from raykit.serving.app import app_builder
    from tests.helpers import build_tiny_decoder

    model = build_tiny_decoder(tmp_path / "qwen3", "qwen3")
    serve.run(
        app_builder(serve_args(model, max_len=256, cpus_per_replica=0.5)),
        name="decoder",
        route_prefix="/decoder",
    )
    try:
        raw = Reranker(model, device="cpu", max_length=256).compute_score(
            [[QUERY, d] for d in DOCS]
        )
        reply = post(served, "/decoder/v1/rerank", {"query": QUERY, "documents": DOCS})
        assert reply.status_code == 200, reply.text
        for r in reply.json()["results"]:
            assert r["relevance_score"] == pytest.approx(
                1 / (1 + np.exp(-raw[r["index"]])), abs=1e-5
            )
        tei = post(served, "/decoder/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True})
        assert {t["index"]: round(t["score"], 4) for t in tei.json()} == {
            i: round(s, 4) for i, s in enumerate(raw)
        }
    finally:
        serve.delete("decoder")

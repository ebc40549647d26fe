"""The Ray Serve endpoint on the tiny model: both API shapes, limits, auth, batching, Cohere."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
import yaml

from raykit.config import ServeConfig
from raykit.model import Reranker
from tests.conftest import ROOT

API_KEY = "test-secret"
QUERY = "When is the best time to plant tulip bulbs?"
DOCS = [
    "Plant tulip bulbs in autumn, a few weeks before the ground freezes.",
    "Tulips were so valuable in the 1630s that single bulbs sold for the price of a house.",
    "Beginners do well with three runs a week and a rest day between them.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir):
    """Two apps from examples/serve.yaml's args: the main one, and one with a 1-request queue."""
    from ray import serve

    from raykit.serve import app_builder

    port = free_port()
    args = yaml.safe_load((ROOT / "examples" / "serve.yaml").read_text())["applications"][0]["args"]
    args.update(model=tiny_model_dir, max_len=64, max_batch_tokens=4096, max_documents=50,
                max_request_bytes=20_000, batch_wait_timeout_s=0.05, api_key=API_KEY,
                max_replicas=1)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(args), name="main", route_prefix="/")
    tight = {**args, "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2,
             "batch_wait_timeout_s": 0.0, "cpus_per_replica": 0.5}  # fmt: skip
    serve.run(app_builder(tight), name="tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, path: str, body, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kwargs)


def test_both_api_shapes_match_reranker(served, tiny_model_dir):
    reranker = Reranker(tiny_model_dir, device="cpu", max_length=64)
    raw = reranker.compute_score([[QUERY, d] for d in DOCS])
    probs = reranker.compute_score([[QUERY, d] for d in DOCS], normalize=True)
    for path in ("/v1/rerank", "/v2/rerank"):
        body = {"query": QUERY, "documents": [DOCS[0], {"text": DOCS[1]}, DOCS[2]], "top_n": 2,
                "return_documents": True}  # fmt: skip
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
    tei = post(served, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True,
                                   "return_text": True}).json()  # fmt: skip
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
    reply = httpx.post(served + "/v1/rerank", content=b"{not json", timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}",
                                "Content-Type": "application/json"})  # fmt: skip
    assert reply.status_code == 422
    assert status("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}) == 422
    form = {"Authorization": f"Bearer {API_KEY}",  # what plain `curl -d '{...}'` sends
            "Content-Type": "application/x-www-form-urlencoded"}  # fmt: skip
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
    info = httpx.get(served + "/info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["max_len"] == 64 and info["auth"] is True and "api_key" not in info
    metrics = httpx.get(served + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert "raykit_forward_passes_total" in metrics.text and 'status="401"' in metrics.text


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
            return await asyncio.gather(*(client.post(served + "/tight/v1/rerank", json=body)
                                          for _ in range(12)))  # fmt: skip

    replies = asyncio.run(flood())
    codes = sorted(r.status_code for r in replies)
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    rejected = next(r for r in replies if r.status_code == 429)
    assert rejected.headers["retry-after"] == "2"


def test_official_cohere_client_works_unchanged(served):
    import cohere

    client = cohere.ClientV2(api_key=API_KEY, base_url=served)
    response = client.rerank(model="raykit", query=QUERY, documents=DOCS, top_n=2)
    assert len(response.results) == 2
    assert response.results[0].relevance_score >= response.results[1].relevance_score
    assert {r.index for r in response.results} <= {0, 1, 2}


def test_serve_config_validation():
    with pytest.raises(Exception, match="min_replicas"):
        ServeConfig(min_replicas=3, max_replicas=2).validate()
    with pytest.raises(Exception, match="max_batch_tokens"):
        ServeConfig(max_len=512, max_batch_tokens=256).validate()


def test_waiting_batches_merge_oldest_first_within_caps_and_share_errors():
    """Serve batches that wait for the model are scored together up to the caps; a failing
    forward pass fails every request in its set and leaves none hanging."""
    from types import SimpleNamespace

    from raykit.serve import RerankerDeployment, _Pair

    score_waiting = RerankerDeployment.func_or_class._score_waiting

    def batch(*pairs: tuple[int, int]) -> list[_Pair]:  # (tokens, value the fake model returns)
        return [_Pair({"input_ids": [value] * tokens}, 0.0) for tokens, value in pairs]

    forward_sizes: list[int] = []

    def forward(pairs: list[_Pair]) -> list[float]:
        forward_sizes.append(len(pairs))
        if any(p.encoding["input_ids"][0] < 0 for p in pairs):
            raise ValueError("bad input")
        return [float(p.encoding["input_ids"][0]) for p in pairs]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        batches = [batch((10, 1), (10, 2)), batch((10, 3)), batch((70, 4), (10, 5)),
                   batch((10, 6)), batch((10, -1))]  # fmt: skip
        futures = [loop.create_future() for _ in batches]
        fake = SimpleNamespace(cfg=ServeConfig(max_batch_size=6, max_batch_tokens=100),
                               waiting=list(zip(batches, futures, strict=True)),
                               _forward=forward)  # fmt: skip
        await score_waiting(fake)  # 20 + 10 tokens; the third batch would make 110 > 100
        assert forward_sizes == [3]
        assert [f.result() for f in futures[:2]] == [[1.0, 2.0], [3.0]]
        assert not any(f.done() for f in futures[2:])
        futures[3].cancel()  # its request went away: the batch is dropped, not scored
        await score_waiting(fake)  # 80 + 10 tokens, 3 pairs: one set, and it fails
        assert forward_sizes == [3, 3] and fake.waiting == []
        for future in (futures[2], futures[4]):
            with pytest.raises(ValueError, match="bad input"):
                future.result()

    asyncio.run(scenario())

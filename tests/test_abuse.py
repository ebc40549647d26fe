"""Hostile and careless requests against `raykit serve`: each row is a request and the status it
must get, always with a JSON body `{"detail": str}` and never a 500 or a stack trace. Add a row
for every new way in."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import SERVE_API_KEY

AUTH = {"Authorization": f"Bearer {SERVE_API_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
OK_BODY = {"query": "tulips", "documents": ["plant them in autumn"]}


def chunked(total: int, piece: int = 64 * 1024):
    """A body without Content-Length (sent chunked), as an httpx generator body."""
    sent = 0
    while sent < total:
        yield b"x" * min(piece, total - sent)
        sent += piece


# (id, method, path, headers, body, expected status, text the detail must contain)
ROWS = [
    (
        "chunked-body-over-limit",
        "POST",
        "/v1/rerank",
        AUTH,
        lambda: chunked(5_000_000),
        413,
        "over 20000 bytes",
    ),
    ("chunked-40mb-tei", "POST", "/rerank", AUTH, lambda: chunked(40_000_000), 413, "over"),
    ("length-over-limit", "POST", "/v1/rerank", AUTH, b"x" * 30_000, 413, "over"),
    (
        "lone-surrogate-document",
        "POST",
        "/v1/rerank",
        JSON,
        b'{"query": "q", "documents": ["\\ud800 x"]}',
        422,
        "documents[0]",
    ),
    (
        "lone-surrogate-tei-query",
        "POST",
        "/rerank",
        JSON,
        b'{"query": "\\udfff", "texts": ["a"]}',
        422,
        "query",
    ),
    (
        "lone-surrogate-text-object",
        "POST",
        "/v2/rerank",
        JSON,
        b'{"query": "q", "documents": ["ok", {"text": "\\ud83d"}]}',
        422,
        "documents[1]",
    ),
    (
        "top-n-nan",
        "POST",
        "/v1/rerank",
        JSON,
        b'{"query": "q", "documents": ["a"], "top_n": NaN}',
        422,
        "top_n",
    ),
    (
        "top-n-infinity",
        "POST",
        "/v1/rerank",
        JSON,
        b'{"query": "q", "documents": ["a"], "top_n": Infinity}',
        422,
        "top_n",
    ),
    (
        "top-n-huge-float",
        "POST",
        "/v1/rerank",
        JSON,
        b'{"query": "q", "documents": ["a"], "top_n": 1e999}',
        422,
        "top_n",
    ),
    ("body-is-array", "POST", "/v1/rerank", JSON, b"[]", 422, "body"),
    ("body-is-null", "POST", "/rerank", JSON, b"null", 422, ""),
    ("body-is-string", "POST", "/v1/rerank", JSON, b'"query"', 422, ""),
    ("body-empty", "POST", "/v1/rerank", JSON, b"", 422, ""),
    ("not-utf8", "POST", "/v1/rerank", JSON, b'{"query": "\xff\xfe", "documents": ["a"]}', 400, ""),
    ("nested-too-deep", "POST", "/v1/rerank", JSON, b"[" * 100_000 + b"]" * 100_000, 413, ""),
    ("nested-deep-small", "POST", "/v1/rerank", JSON, b"[" * 5_000 + b"]" * 5_000, 400, ""),
    (
        "document-text-number",
        "POST",
        "/v1/rerank",
        JSON,
        b'{"query": "q", "documents": [{"text": 5}]}',
        422,
        "documents",
    ),
    ("query-missing", "POST", "/rerank", JSON, b'{"texts": ["a"]}', 422, "query"),
    (
        "documents-empty",
        "POST",
        "/v1/rerank",
        JSON,
        b'{"query": "q", "documents": []}',
        400,
        "documents",
    ),
    (
        "query-blank",
        "POST",
        "/v1/rerank",
        JSON,
        b'{"query": "  ", "documents": ["a"]}',
        400,
        "query",
    ),
    (
        "too-many-documents",
        "POST",
        "/v1/rerank",
        JSON,
        json.dumps({"query": "q", "documents": ["d"] * 51}).encode(),
        413,
        "max_documents",
    ),
    (
        "max-tokens-zero",
        "POST",
        "/v1/rerank",
        JSON,
        b'{"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}',
        422,
        "max_tokens_per_doc",
    ),
    ("wrong-method", "GET", "/v1/rerank", AUTH, None, 405, ""),
    ("unknown-path", "GET", "/admin", AUTH, None, 404, ""),
    ("no-key", "POST", "/v1/rerank", {}, json.dumps(OK_BODY).encode(), 401, "API key"),
    ("wrong-key", "GET", "/metrics", {"Authorization": "Bearer nope"}, None, 401, "API key"),
    ("unknown-path-no-key", "GET", "/x%22%7D%201%0Ainjected", {}, None, 401, ""),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "detail"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_hostile_request_gets_a_clear_json_error(
    served, method, path, headers, body, status, detail
):
    content = body() if callable(body) else body
    reply = httpx.request(method, served + path, content=content, headers=headers, timeout=120)
    assert reply.status_code == status, reply.text[:500]
    payload = reply.json()
    assert isinstance(payload["detail"], str) and detail in payload["detail"], payload
    assert "Traceback" not in reply.text
    # The server is still fine afterwards.
    assert httpx.post(served + "/v1/rerank", json=OK_BODY, headers=AUTH, timeout=60).is_success


def test_metrics_labels_come_from_the_route_table_only(served):
    def metrics_page() -> str:
        return httpx.get(served + "/metrics", headers=AUTH, timeout=30).text

    before = metrics_page()
    with httpx.Client(timeout=30) as client:
        for i in range(200):
            client.get(f"{served}/x{i}-{'a' * 200}")  # unauthenticated, all different
        client.get(served + "/x%22%7D%201%0Araykit_injected_total%201")
    after = metrics_page()
    assert len(after.splitlines()) <= len(before.splitlines()) + 40  # new label sets, not paths
    assert "raykit_injected" not in after and "aaaa" not in after
    families = {f.name: f for f in text_string_to_metric_families(after)}  # still parseable
    routes = {s.labels["route"] for s in families["raykit_requests"].samples}
    assert routes <= {"/v1/rerank", "/v2/rerank", "/rerank", "/info", "other"}
    other = [
        s
        for s in families["raykit_requests"].samples
        if s.labels["route"] == "other"
        and s.name.endswith("_total")
        and s.labels["status"] == "401"
    ]
    assert other and other[0].value >= 201

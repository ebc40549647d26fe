"""A reranking endpoint on Ray Serve that Cohere/Jina and text-embeddings-inference clients call
unchanged.

Routes: `POST /v1/rerank` and `/v2/rerank` (Cohere/Jina shape), `POST /rerank` (TEI shape),
`GET /health`, `GET /info`, `GET /metrics` (Prometheus text of this replica's counters; the same
counters also go to Ray's own Prometheus export with Serve's metrics).

Every (query, document) pair of every request goes through one `@serve.batch` queue, so pairs from
concurrent requests share forward passes and a long request is split into model-sized batches.
A batch is capped by `max_batch_tokens` tokens and `max_batch_size` pairs, sorted by length and
run in chunks of `chunk_tokens` padded tokens.

`serve run examples/serve.yaml` uses `app_builder`; `raykit serve` uses `build_app` + `run_serve`.
No `from __future__ import annotations` here: FastAPI must see the request models as real types
in the signatures Serve rewrites for class-based routes.
"""

import asyncio
import hmac
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.metrics import Counter, Histogram

from raykit.config import ConfigError, ServeConfig, load_config
from raykit.model import batch_logits, sigmoid

HEALTH_PATH = "/health"


# ---------------------------------------------------------------------------- API shapes


class TextDocument(BaseModel):
    text: str


class CohereRerankRequest(BaseModel):
    """Cohere /v1|v2/rerank and Jina /v1/rerank."""

    model: str | None = None
    query: str
    documents: list[str | TextDocument]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(default=None, ge=1)


class TeiRerankRequest(BaseModel):
    """text-embeddings-inference /rerank."""

    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


@dataclass
class _Pair:
    """One tokenised (query, document) pair waiting in the batch queue."""

    encoding: dict[str, list[int]]  # input_ids (+ token_type_ids)
    cost_floor: float  # max_batch_tokens / max_batch_size: caps the pairs per batch

    @property
    def tokens(self) -> int:
        return len(self.encoding["input_ids"])


def batch_cost(pairs: list[_Pair]) -> int:
    """Tokens of a batch, and at least its share of the pair cap (see `_Pair`).

    Plain tokens, not padded ones: `_forward` sorts the batch by length and pads each chunk only
    to its own longest pair, so one long pair does not make the whole batch expensive.
    """
    tokens = sum(p.tokens for p in pairs)
    return math.ceil(max(tokens, len(pairs) * pairs[0].cost_floor))


# Serve batches that may wait for the model at once; more wait in Serve's queue.
MAX_WAITING_BATCHES = 64

# Helpers the deployment uses sit above it: Serve pickles the class by value when it is
# decorated, so names defined further down would be missing in the replica.


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------- the deployment

api = FastAPI(title="raykit reranker", docs_url=None, redoc_url=None)
_replica: "RerankerDeployment | None" = None  # this process's replica (one per process)


@api.middleware("http")
async def guard(request: Request, call_next: Any) -> Any:
    """API key, body size, and per-route counters for every request."""
    started = time.perf_counter()
    path = request.url.path[len(request.scope.get("root_path", "")) :] or "/"
    replica = _replica
    if replica is None:
        return _error(503, "model is loading")
    response = None
    if replica.api_key and path != HEALTH_PATH:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {replica.api_key}".encode()):
            response = _error(401, "missing or wrong API key")
    length = request.headers.get("content-length")
    max_bytes = replica.cfg.max_request_bytes
    if response is None and length and length.isdigit() and int(length) > max_bytes:
        response = _error(413, f"request body over {max_bytes} bytes")
    if response is None:
        # `curl -d '{...}'` sends form encoding; every route here takes JSON, so read it as JSON.
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
        request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
        response = await call_next(request)
    replica.record(path, started, response.status_code)
    return response


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message)


@serve.deployment
@serve.ingress(api)
class RerankerDeployment:
    """Holds the model on its replica and answers every route."""

    def __init__(self, cfg: ServeConfig):
        import torch

        from raykit.model import load_model_and_tokenizer

        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, cfg.trust_remote_code)
        self.model = model.to(self.device).eval()
        on_gpu = self.device.type == "cuda"
        self.dtype = None
        if on_gpu and (cfg.fp16 or cfg.bf16):
            self.dtype = torch.float16 if cfg.fp16 else torch.bfloat16
        self.api_key = cfg.api_key or os.environ.get("RAYKIT_API_KEY") or None
        self.model_name = cfg.model_name or cfg.model
        self.waiting: list[tuple[list[_Pair], asyncio.Future]] = []  # Serve batches, oldest first
        self.model_lock = asyncio.Lock()
        self.score_pair.set_max_batch_size(cfg.max_batch_tokens)
        self.score_pair.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.stats = {"requests": 0, "documents": 0, "tokens": 0, "forward_passes": 0,
                      "pairs_scored": 0, "latency_sum_s": 0.0, "forward_s": 0.0}  # fmt: skip
        self.status_counts: dict[str, int] = {}
        self.metric_requests = Counter("raykit_requests", "Rerank requests.", ("route", "status"))
        self.metric_documents = Counter("raykit_documents", "Documents scored.")
        self.metric_tokens = Counter("raykit_tokens", "Tokens scored.")
        self.metric_forwards = Counter("raykit_forward_passes", "Model forward passes.")
        self.metric_latency = Histogram(
            "raykit_request_latency_s", "Request latency in seconds.",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], tag_keys=("route",),
        )  # fmt: skip
        # For the HTTP middleware, which FastAPI runs outside the class. Serve ships this class
        # by value, so a `global` here would set a copy: set the imported module's attribute.
        sys.modules[__name__]._replica = self

    # ------------------------------------------------------------------ routes

    def record(self, path: str, started: float, status: int) -> None:
        if path in (HEALTH_PATH, "/metrics"):
            return
        self.stats["requests"] += 1
        self.stats["latency_sum_s"] += time.perf_counter() - started
        key = f'route="{path}",status="{status}"'
        self.status_counts[key] = self.status_counts.get(key, 0) + 1
        self.metric_requests.inc(tags={"route": path, "status": str(status)})
        self.metric_latency.observe(time.perf_counter() - started, tags={"route": path})

    @api.get(HEALTH_PATH)
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/info")
    async def info(self) -> dict:
        fields = asdict(self.cfg)
        fields.pop("api_key")
        return {"model_name": self.model_name, "device": str(self.device),
                "dtype": str(self.dtype or "float32"), "auth": bool(self.api_key),
                **fields, "replica_stats": dict(self.stats)}  # fmt: skip

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        lines = [f"raykit_requests_total{{{k}}} {v}" for k, v in self.status_counts.items()]
        for name in ("documents", "tokens", "forward_passes", "pairs_scored"):
            lines.append(f"raykit_{name}_total {self.stats[name]}")
        lines.append(f"raykit_request_latency_seconds_sum {self.stats['latency_sum_s']:.6f}")
        lines.append(f"raykit_request_latency_seconds_count {self.stats['requests']}")
        lines.append(f"raykit_forward_seconds_total {self.stats['forward_s']:.6f}")
        return PlainTextResponse("\n".join(lines) + "\n")

    @api.post("/v1/rerank")
    async def rerank_v1(self, body: CohereRerankRequest) -> dict:
        return await self._cohere(body)

    @api.post("/v2/rerank")
    async def rerank_v2(self, body: CohereRerankRequest) -> dict:
        return await self._cohere(body)

    @api.post("/rerank")
    async def rerank_tei(self, body: TeiRerankRequest) -> list[dict]:
        logits, _ = await self.score_documents(body.query, body.texts)
        scores = logits if body.raw_scores else [sigmoid(x) for x in logits]
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [{"index": i, "score": scores[i], **({"text": body.texts[i]} if body.return_text
                else {})} for i in ranked]  # fmt: skip

    async def _cohere(self, body: CohereRerankRequest) -> dict:
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        logits, tokens = await self.score_documents(body.query, texts)
        ranked = sorted(range(len(texts)), key=lambda i: -logits[i])[: body.top_n]
        results = []
        for i in ranked:
            result: dict[str, Any] = {"index": i, "relevance_score": sigmoid(logits[i])}
            if body.return_documents:
                result["document"] = {"text": texts[i]}
            results.append(result)
        return {
            "id": str(uuid.uuid4()),
            "model": body.model or self.model_name,
            "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                     "tokens": {"input_tokens": tokens, "output_tokens": 0}},
            "usage": {"total_tokens": tokens},  # Jina's field
        }  # fmt: skip

    # ------------------------------------------------------------------ scoring

    async def score_documents(self, query: str, texts: list[str]) -> tuple[list[float], int]:
        """Raw logits for each text (in order) and the tokens they cost."""
        from raykit.data import tokenize_pairs

        if not texts:
            raise ApiError(400, "documents: must not be empty")
        if len(texts) > self.cfg.max_documents:
            raise ApiError(413, f"documents: {len(texts)} > max_documents {self.cfg.max_documents}")
        if not query.strip():
            raise ApiError(400, "query: must not be empty")
        encodings = tokenize_pairs(self.tokenizer, [query] * len(texts), texts, self.cfg.max_len)
        floor = self.cfg.max_batch_tokens / self.cfg.max_batch_size
        pairs = [_Pair(e, floor) for e in encodings]
        logits = await asyncio.gather(*(self.score_pair(p) for p in pairs))
        tokens = sum(len(e["input_ids"]) for e in encodings)
        self.stats["documents"] += len(texts)
        self.stats["tokens"] += tokens
        self.metric_documents.inc(len(texts))
        self.metric_tokens.inc(tokens)
        return list(logits), tokens

    @serve.batch(
        max_batch_size=16384, batch_wait_timeout_s=0.01, batch_size_fn=batch_cost,
        max_concurrent_batches=MAX_WAITING_BATCHES,
    )  # fmt: skip
    async def score_pair(self, pairs: list[_Pair]) -> list[float]:
        """Scores of one Serve batch (pairs from any number of requests).

        Serve forms the next batch while the model is still busy with the last one, from the
        few pairs that arrive within `batch_wait_timeout_s`. So batches wait here for the
        model, and whoever gets it scores every batch waiting by then (up to the caps) as one
        length-sorted set: under load the model always gets full, well-sorted work, and an
        idle model starts on a lone request at once.
        """
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((pairs, future))
        async with self.model_lock:
            if not future.done():  # else an earlier holder already scored this batch
                # Shielded: if this request is cancelled, the batches it took still get scores.
                await asyncio.shield(self._score_waiting())
        return await future

    async def _score_waiting(self) -> None:
        """Score the oldest waiting batches that fit the caps (the first always goes). Batches
        whose requests were cancelled meanwhile are dropped, not scored."""
        self.waiting = [(batch, future) for batch, future in self.waiting if not future.done()]
        if not self.waiting:
            return
        taken = [self.waiting.pop(0)]
        pairs, tokens = list(taken[0][0]), sum(p.tokens for p in taken[0][0])
        while self.waiting:
            more = self.waiting[0][0]
            more_tokens = sum(p.tokens for p in more)
            if (len(pairs) + len(more) > self.cfg.max_batch_size
                    or tokens + more_tokens > self.cfg.max_batch_tokens):  # fmt: skip
                break
            taken.append(self.waiting.pop(0))
            pairs += more
            tokens += more_tokens
        try:
            loop = asyncio.get_running_loop()
            scores = await loop.run_in_executor(None, self._forward, pairs)
        except Exception as exc:  # every caller in this set gets the error, none hangs
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for batch, future in taken:
            if not future.done():  # a request cancelled during the forward pass
                future.set_result(scores[start : start + len(batch)])
            start += len(batch)

    def _forward(self, pairs: list[_Pair]) -> list[float]:
        """Score a batch: pairs of similar length are padded together, chunk by chunk."""
        from raykit.data import chunk_by_length, pad_encodings

        started = time.perf_counter()
        scores = [0.0] * len(pairs)
        lengths = [p.tokens for p in pairs]
        for chunk in chunk_by_length(lengths, self.cfg.chunk_tokens):
            encodings = [pairs[i].encoding for i in chunk]
            batch = pad_encodings(encodings, self.tokenizer.pad_token_id or 0)
            logits = batch_logits(self.model, batch, self.dtype).tolist()
            for i, value in zip(chunk, logits, strict=True):
                scores[i] = value
            self.stats["forward_passes"] += 1
            self.metric_forwards.inc()
        self.stats["pairs_scored"] += len(pairs)
        self.stats["forward_s"] += time.perf_counter() - started
        return scores


# ---------------------------------------------------------------------------- building and running


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: autoscaling, placement and queue limits from the config."""
    cfg.validate()
    ongoing = cfg.max_ongoing_requests or cfg.max_batch_size
    return RerankerDeployment.options(
        name="reranker",
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        },
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": 1 if cfg.use_gpu else 0},
        max_ongoing_requests=ongoing,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
        logging_config={"enable_access_log": cfg.access_log},
    ).bind(cfg)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path` target for Serve config files: `args` are ServeConfig keys."""
    return build_app(load_config(ServeConfig, **(args or {})))


def run_serve(cfg: ServeConfig, stop: threading.Event | None = None) -> None:
    """Start Serve's proxy on host:port, deploy the app, and block until Ctrl-C / SIGTERM
    (or, with `detach`, return and leave the app running on the cluster)."""
    import ray

    from raykit.cluster import init_ray

    cfg.validate()
    if not cfg.use_gpu and cfg.cpus_per_replica * cfg.max_replicas < 1:
        raise ConfigError("cpus_per_replica x max_replicas must be >= 1")
    started_ray = not ray.is_initialized()
    init_ray(cfg.cpus_per_replica * cfg.max_replicas)
    stop = stop or threading.Event()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
        prefix = cfg.route_prefix.rstrip("/")
        print(f"[raykit] serving {cfg.model} at http://{cfg.host}:{cfg.port}{prefix}/v1/rerank "
              "(Ctrl-C to stop)", flush=True)  # fmt: skip
        if cfg.detach:
            print(f"[raykit] deployed {cfg.app_name!r}; `serve shutdown` removes it", flush=True)
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if not cfg.detach:
            print("[raykit] shutting down", flush=True)
            serve.shutdown()
            if started_ray:
                ray.shutdown()

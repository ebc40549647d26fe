"""A reranking endpoint on Ray Serve that Cohere/Jina and text-embeddings-inference clients call
unchanged.

Routes: `POST /v1/rerank` and `/v2/rerank` (Cohere/Jina shape), `POST /rerank` (TEI shape),
`GET /health`, `GET /info`, `GET /metrics` (Prometheus text of the API's request, document, token
and latency counters; the model replicas' counters go to Ray's own Prometheus export).

Two deployments, as in Ray's model-composition examples:
- `RerankerAPI` (the ingress, no model): the HTTP surface. API key, one body-size limit whatever
  the transfer encoding, validation with JSON errors (never a 500 for a JSON body), and the
  mapping of Serve's failures: a full queue is a JSON 429, a request lost with a model replica is
  retried once and then a JSON 503, both with Retry-After.
- `RerankerModel` (autoscaled, one GPU or `cpus_per_replica` CPUs each): compiles its model
  before it serves (`--compile`, on CPU by default), tokenises off the event loop and scores
  through one token-budgeted queue (`raykit.serving.queue.BatchQueue`), so pairs of concurrent
  requests share forward passes; a disconnected client's pairs are dropped. The ingress's
  /health is 503 until a model replica answers.

`serve run examples/serve.yaml` uses `app_builder`; `raykit serve` uses `build_app` + `run_serve`.
No `from __future__ import annotations` here: FastAPI must see the request models as real types
in the signatures Serve rewrites for class-based routes.
"""

import asyncio
import hmac
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter

from raykit.config import ConfigError, ServeConfig, load_config
from raykit.core.activation import sigmoid_array
from raykit.data.groups import lone_surrogate
from raykit.runtime.logs import logger
from raykit.runtime.storage import is_uri

HEALTH_PATH = "/health"
ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank", "/info", "/metrics", HEALTH_PATH)
OTHER_ROUTE = "other"  # the metrics label of every path that is not a route
HEALTH_PROBE_S = 2.0  # how long /health waits for a model replica before answering 503


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
    truncate: bool | None = None  # None: truncate, as TEI's --auto-truncate


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """'field: problem' for each validation error, without echoing the input (which may be
    NaN, huge, or not JSON-serialisable at all)."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


def public_model_name(model: str) -> str:
    """What clients see as the model: a hub id as it is, the last part of a path or URI (never
    a server's local path)."""
    if (
        is_uri(model)
        or os.path.isabs(model)
        or model.startswith((".", "~"))
        or os.path.isdir(model)
    ):
        return os.path.basename(model.rstrip("/")) or "reranker"
    return model


def check_texts(query: str, texts: list[str], field: str, max_documents: int) -> None:
    if not texts:
        raise ApiError(400, f"{field}: must not be empty")
    if len(texts) > max_documents:
        raise ApiError(413, f"{field}: {len(texts)} > max_documents {max_documents}")
    if not query.strip():
        raise ApiError(400, "query: must not be empty")
    if lone_surrogate(query):
        raise ApiError(422, "query: not valid Unicode (a lone surrogate escape)")
    for i, text in enumerate(texts):
        if lone_surrogate(text):
            raise ApiError(422, f"{field}[{i}]: not valid Unicode (a lone surrogate escape)")


# ---------------------------------------------------------------------------- the HTTP guard


class RequestGuard:
    """Pure ASGI middleware on the ingress: API key, body-size limit, per-route counters.

    The body is read here, chunk by chunk, and refused with 413 as soon as it passes
    `max_request_bytes`, whether it came with a Content-Length or chunked; what was read is then
    replayed to the app. Every body is read as JSON (`curl -d` sends form encoding).
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        api = _ingress
        if scope["type"] != "http" or api is None:
            if scope["type"] == "http":
                await _error(503, "starting up")(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"][len(scope.get("root_path", "")) :] or "/"
        status = {"code": 500}

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            response = self._refuse(scope, path, api)
            if response is None:
                body, response = await self._read_body(receive, api.cfg.max_request_bytes)
            if response is not None:
                await response(scope, receive, send_and_record)
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: only a disconnect is left

            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            await self.app(scope, replay, send_and_record)
        finally:
            api.record(path, started, status["code"])

    @staticmethod
    def _refuse(scope: dict, path: str, api: "RerankerAPI") -> Response | None:
        headers = dict(scope["headers"])
        if api.api_key and path != HEALTH_PATH:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {api.api_key}".encode()):
                return _error(401, "missing or wrong API key")
        length = headers.get(b"content-length", b"")
        limit = api.cfg.max_request_bytes
        if length.isdigit() and int(length) > limit:
            return _error(413, f"request body over {limit} bytes")
        return None

    @staticmethod
    async def _read_body(receive: Any, limit: int) -> tuple[bytes, Response | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", _error(499, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # stop reading: the rest of the body is never held
                return b"", _error(413, f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


# ---------------------------------------------------------------------------- the model replica


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@serve.deployment
class RerankerModel:
    """Holds the model; scores (query, documents) requests through one `BatchQueue`."""

    def __init__(self, cfg: ServeConfig):
        from raykit.core.engine import InferenceEngine
        from raykit.runtime.console import quiet_ray
        from raykit.serving.queue import BatchQueue

        quiet_ray()  # Ray's deprecation notices in this actor, as on the driver

        self.cfg = cfg
        use_gpu = cfg.use_gpu and _cuda_available()
        self.engine = InferenceEngine.from_config(
            cfg,
            cfg.model,
            use_gpu=use_gpu,
            threads=cfg.cpus_per_replica,
            max_batch_size=cfg.max_batch_size,
        )
        if cfg.compiles(self.engine.device.type):
            self.engine.compile_model()
        # One thread runs the model, one tokenises: the event loop only moves requests in and
        # out of the queue.
        self.model_thread = ThreadPoolExecutor(1, "raykit-model")
        self.tokenizer_thread = ThreadPoolExecutor(1, "raykit-tokenizer")
        self.queue = BatchQueue(
            self._forward,
            cfg.max_batch_size,
            cfg.max_batch_tokens,
            self.model_thread,
            cfg.batch_wait_timeout_s,
        )
        self.metric_documents = Counter("raykit_documents", "Documents scored.")
        self.metric_tokens = Counter("raykit_tokens", "Tokens scored.")
        self.metric_forwards = Counter("raykit_forward_passes", "Model forward passes.")

    def _tokenize(
        self, query: str, texts: list[str], max_tokens_per_doc: int | None, truncate: bool
    ) -> list[dict[str, list[int]]] | str:
        """Encodings of every pair, or (with `truncate` False) a message naming the first pair
        that the engine's limits would cut: the very encoding that will be scored (a decoder's
        whole prompt) is measured."""
        queries = [query] * len(texts)
        encodings = self.engine.tokenize(queries, texts, passage_max_len=max_tokens_per_doc)
        if not truncate:
            over = self.engine.first_cut(queries, texts, encodings)
            if over is not None:
                index, length = over
                what = "prompt" if self.engine.template is not None else "pair"
                return (
                    f"texts[{index}]: the {what} is {length} tokens, over the model's limits "
                    f"(max_len {self.engine.max_len}, query_max_len "
                    f"{self.engine.query_max_len or self.engine.max_len // 2}); send "
                    "truncate: true to cut it"
                )
        return encodings

    async def score(
        self,
        query: str,
        texts: list[str],
        max_tokens_per_doc: int | None = None,
        truncate: bool = True,
    ) -> dict[str, Any]:
        """{"logits": [...], "tokens": n}, or {"status": 413, "error": "..."}."""
        loop = asyncio.get_running_loop()
        encodings = await loop.run_in_executor(
            self.tokenizer_thread, self._tokenize, query, texts, max_tokens_per_doc, truncate
        )
        if isinstance(encodings, str):
            return {"status": 413, "error": encodings}
        logits = await self.queue.score(encodings)
        tokens = sum(len(e["input_ids"]) for e in encodings)
        self.metric_documents.inc(len(texts))
        self.metric_tokens.inc(tokens)
        return {"logits": logits.tolist(), "tokens": tokens}

    def _forward(self, pairs: list[dict[str, list[int]]]) -> np.ndarray:
        """Score one batch from the queue (the engine chunks it by length and token budget)."""
        before = self.engine.stats.forward_passes
        scores = self.engine.score_encodings(pairs)
        self.metric_forwards.inc(self.engine.stats.forward_passes - before)
        return scores

    async def ready(self) -> bool:
        """Answers once this replica's model is loaded (and compiled): the ingress's /health."""
        return True

    async def info(self) -> dict[str, Any]:
        engine = self.engine
        spec = engine.spec
        return {
            # How the model scores: its spec with the options applied.
            "scoring": {
                "model_kind": spec.kind,
                "max_len": spec.max_len,
                "query_max_len": spec.query_max_len,
                "passage_max_len": spec.passage_max_len,
                "instruction": spec.template.instruction if spec.template else None,
            },
            "device": str(engine.device),
            "dtype": engine.precision,
            "compiled": engine.compiled,
            "forward_passes": engine.stats.forward_passes,
            "padding_ratio": round(engine.stats.padding_ratio, 4),
            "queued_requests": len(self.queue.waiting),
            **asdict(self.queue.stats),
        }


# ---------------------------------------------------------------------------- the ingress

api = FastAPI(title="raykit reranker", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(RequestGuard)
_ingress: "RerankerAPI | None" = None  # this process's ingress replica


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, validation_message(exc))


@serve.deployment
@serve.ingress(api)
class RerankerAPI:
    """The HTTP surface; every scoring call goes to `RerankerModel` through a handle."""

    def __init__(self, cfg: ServeConfig, model: DeploymentHandle):
        from prometheus_client import CollectorRegistry
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Histogram as PromHistogram

        self.cfg = cfg
        self.model = model
        self.model_ready = False  # set by the first /health a model replica answers
        self.api_key = cfg.api_key or os.environ.get("RAYKIT_API_KEY") or None
        self.model_name = cfg.model_name or public_model_name(cfg.model)
        # Labels come from the route table only: any other path is counted as "other", so no
        # client can add series to this page.
        self.registry = CollectorRegistry()
        self.requests = PromCounter(
            "raykit_requests",
            "HTTP requests by route and status.",
            ("route", "status"),
            registry=self.registry,
        )
        self.latency = PromHistogram(
            "raykit_request_latency_seconds",
            "Request latency by route.",
            ("route",),
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        registry = self.registry
        self.documents = PromCounter("raykit_documents", "Documents scored.", registry=registry)
        self.tokens = PromCounter("raykit_tokens", "Tokens scored.", registry=registry)
        self.ray_requests = Counter("raykit_requests", "HTTP requests.", ("route", "status"))
        sys.modules[__name__]._ingress = self  # for RequestGuard (Serve ships this class by value)

    def record(self, path: str, started: float, status: int) -> None:
        route = path if path in ROUTES else OTHER_ROUTE
        if route in (HEALTH_PATH, "/metrics"):
            return
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)
        self.ray_requests.inc(tags={"route": route, "status": str(status)})

    # ------------------------------------------------------------------ routes

    @api.get(HEALTH_PATH)
    async def health(self) -> dict:
        """200 once a model replica has answered, 503 while the models still load or compile
        (the proxy routes to this ingress long before): a readiness probe that can be trusted."""
        if not self.model_ready:
            try:
                await asyncio.wait_for(self.model.ready.remote(), HEALTH_PROBE_S)
            except Exception:  # not answering in time, for whatever reason
                retry_after = {"Retry-After": str(self.cfg.retry_after_s)}
                raise ApiError(503, "the model is loading", retry_after) from None
            self.model_ready = True
        return {"status": "ok"}

    @api.get("/info")
    async def info(self) -> dict:
        fields = asdict(self.cfg)
        for private in ("api_key", "model"):  # never a server's path or secret
            fields.pop(private)
        replica = await self._call("info")
        fields["dtype_requested"] = fields.pop("dtype")
        return {
            "model_name": self.model_name,
            "device": replica.pop("device"),
            "dtype": replica.pop("dtype"),
            "compiled": replica.pop("compiled"),
            "auth": bool(self.api_key),
            **fields,
            **replica.pop("scoring"),
            "replica_stats": replica,
        }

    @api.get("/metrics")
    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/rerank")
    async def rerank_v1(self, body: CohereRerankRequest) -> dict:
        return await self._cohere(body)

    @api.post("/v2/rerank")
    async def rerank_v2(self, body: CohereRerankRequest) -> dict:
        return await self._cohere(body)

    @api.post("/rerank")
    async def rerank_tei(self, body: TeiRerankRequest) -> list[dict]:
        check_texts(body.query, body.texts, "texts", self.cfg.max_documents)
        truncate = True if body.truncate is None else body.truncate
        logits, _ = await self._score(body.query, body.texts, None, truncate)
        scores = logits if body.raw_scores else sigmoid_array(logits).tolist()
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [
            {
                "index": i,
                "score": scores[i],
                **({"text": body.texts[i]} if body.return_text else {}),
            }
            for i in ranked
        ]

    async def _cohere(self, body: CohereRerankRequest) -> dict:
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        check_texts(body.query, texts, "documents", self.cfg.max_documents)
        logits, tokens = await self._score(body.query, texts, body.max_tokens_per_doc, True)
        ranked = sorted(range(len(texts)), key=lambda i: -logits[i])[: body.top_n]
        results = []
        relevance = sigmoid_array(logits).tolist()
        for i in ranked:
            result: dict[str, Any] = {"index": i, "relevance_score": relevance[i]}
            if body.return_documents:
                result["document"] = {"text": texts[i]}
            results.append(result)
        return {
            "id": str(uuid.uuid4()),
            "model": body.model or self.model_name,
            "results": results,
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": tokens, "output_tokens": 0},
            },
            "usage": {"total_tokens": tokens},  # Jina's field
        }

    # ------------------------------------------------------------------ calling the model

    async def _score(
        self, query: str, texts: list[str], max_tokens_per_doc: int | None, truncate: bool
    ) -> tuple[list[float], int]:
        reply = await self._call("score", query, texts, max_tokens_per_doc, truncate)
        if "error" in reply:
            raise ApiError(reply["status"], reply["error"])
        self.documents.inc(len(texts))
        self.tokens.inc(reply["tokens"])
        return reply["logits"], reply["tokens"]

    async def _call(self, method: str, *args: Any) -> Any:
        """Call the model deployment; Serve's failures become JSON 429/503 with Retry-After.

        Scoring is idempotent, so a request lost with a replica (killed, preempted) is sent
        once more, to whichever replica Serve picks; a second loss is a 503."""
        retry_after = {"Retry-After": str(self.cfg.retry_after_s)}
        for attempt in range(2):
            try:
                return await getattr(self.model, method).remote(*args)
            except BackPressureError:
                raise ApiError(429, "too many requests queued; retry later", retry_after) from None
            except DeploymentUnavailableError:
                raise ApiError(503, "the model is unavailable", retry_after) from None
            except RayActorError:
                if attempt == 1:
                    raise ApiError(503, "the model replica went away; retry", retry_after) from None
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- building and running


def fill_node(cfg: ServeConfig, local: bool = False) -> ServeConfig:
    """`cfg` with unset replica counts and CPU shares sized to the node (see `sized_for`)."""
    if cfg.min_replicas and cfg.max_replicas and cfg.cpus_per_replica:
        return cfg
    import ray

    from raykit.runtime.cluster import Capacity, capacity

    if ray.is_initialized():
        cap = capacity(local)
    else:
        cap = Capacity(os.cpu_count() or 1, os.cpu_count() or 1, 0)
    return cfg.sized_for(cap.node_cpus, cap.gpus)


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: autoscaling, placement and queue limits from the config."""
    cfg.check_paths()
    cfg = fill_node(cfg)
    ongoing = cfg.max_ongoing_requests or cfg.max_batch_size
    # A fixed count when min == max: no autoscaling metrics flow from replicas to the controller.
    if cfg.min_replicas == cfg.max_replicas:
        replicas: dict[str, Any] = {"num_replicas": cfg.max_replicas}
    else:
        replicas = {
            "autoscaling_config": {
                "min_replicas": cfg.min_replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
            }
        }
    model = RerankerModel.options(
        name="reranker_model",
        **replicas,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": 1 if cfg.use_gpu else 0},
        max_ongoing_requests=ongoing,
        max_queued_requests=cfg.max_queued_requests,  # beyond: a JSON 429 from the ingress
        logging_config={"enable_access_log": False},
    ).bind(cfg)
    # The ingress only waits on the model: no CPU of its own, room for every request the model
    # replicas and their queue can hold (the last line of defence is Serve's own 429).
    capacity = ongoing * cfg.max_replicas + cfg.max_queued_requests
    return RerankerAPI.options(
        name="reranker",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=capacity + 16,
        max_queued_requests=capacity,
        backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
        logging_config={"enable_access_log": cfg.access_log},
    ).bind(cfg, model)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path` target for Serve config files: `args` are ServeConfig keys. A local model
    is checked here (a trained head, its spec's overrides said) before replicas start; one on
    S3 or the hub is checked by the replicas that fetch it."""
    from raykit.core.loading import resolve_model_path
    from raykit.core.spec import check_reranker

    cfg = load_config(ServeConfig, **(args or {}))
    if os.path.isdir(resolve_model_path(cfg.model)):
        check_reranker(cfg.model, cfg)
    return build_app(cfg)


def run_serve(cfg: ServeConfig, stop: threading.Event | None = None) -> None:
    """Start Serve's proxy on host:port, deploy the app, and block until Ctrl-C / SIGTERM
    (or, with `detach`, return and leave the app running on the cluster)."""
    import ray

    from raykit.core.precision import describe_precision
    from raykit.core.spec import check_reranker
    from raykit.runtime.cluster import init_ray

    started = time.perf_counter()
    cfg.check_paths()
    cfg.check_hardware(cfg.use_gpu)
    if cfg.cpus_per_replica and cfg.max_replicas and cfg.cpus_per_replica * cfg.max_replicas < 1:
        raise ConfigError("cpus_per_replica x max_replicas must be >= 1")
    spec = check_reranker(cfg.model, cfg)
    if spec and spec.max_len > cfg.max_batch_tokens:
        raise ConfigError(f"max_batch_tokens: must be >= the model's max_len {spec.max_len}")
    started_ray = not ray.is_initialized()
    explicit = cfg.max_replicas and cfg.cpus_per_replica and cfg.max_replicas * cfg.cpus_per_replica
    local = init_ray(explicit or (os.cpu_count() or 1))
    cfg = fill_node(cfg, local)
    stop = stop or threading.Event()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
        prefix = cfg.route_prefix.rstrip("/")
        each = "1 GPU" if cfg.use_gpu else f"{cfg.cpus_per_replica:g} CPU"
        replicas = (
            f"{cfg.min_replicas}-{cfg.max_replicas}"
            if cfg.min_replicas != cfg.max_replicas
            else str(cfg.max_replicas)
        )
        device = "cuda" if cfg.use_gpu else "cpu"
        compiled = "compiled" if cfg.compiles(device) else "eager"
        logger.info(
            f"ready in {time.perf_counter() - started:.1f} s: {replicas} replica(s) x "
            f"{each}, {describe_precision(cfg.precision, device)}, {compiled}"
        )
        logger.info(
            f"serving {cfg.model} at http://{cfg.host}:{cfg.port}{prefix}/v1/rerank "
            "(Ctrl-C to stop)"
        )
        if cfg.detach:
            logger.info(f"deployed {cfg.app_name!r}; `serve shutdown` removes it")
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if not cfg.detach:
            logger.info("shutting down")
            serve.shutdown()
            if started_ray:
                ray.shutdown()

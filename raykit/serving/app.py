"""A reranking endpoint on Ray Serve that Cohere/Jina and text-embeddings-inference clients call
unchanged.

Routes: `POST /v1/rerank` and `/v2/rerank` (Cohere/Jina shape), `POST /rerank` (TEI shape),
`GET /v1/models`, `GET /health` (readiness), `GET /live` (liveness), `GET /info`, `GET /metrics`
(Prometheus text of the API's request, document, token and latency counters; the model
replicas' counters go to Ray's own Prometheus export).

Deployments, as in Ray's model-composition examples:
- `RerankerAPI` (the ingress, no model): the HTTP surface. API key, one body-size limit whatever
  the transfer encoding, validation with JSON errors (never a 500 for a JSON body), routing on
  the request's `model` field, and the mapping of Serve's failures: a full queue is a JSON 429,
  a request lost with a model replica is retried once and then a JSON 503, both with
  Retry-After. /health asks Serve's controller how many model replicas run (never the model).
- one `RerankerModel` deployment per served model (`raykit.serving.replica`), autoscaled,
  each replica with its own token-budgeted queue; its checkpoint is its user_config, so a new
  one rolls out in place (`raykit.serving.rollout`).

`serve run examples/serve.yaml` uses `app_builder`; `raykit serve` uses `build_app` + `run_serve`.
No `from __future__ import annotations` here: FastAPI must see the request models as real types
in the signatures Serve rewrites for class-based routes.
"""

import dataclasses
import hmac
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any

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
from raykit.core.served import ServedModel
from raykit.data.groups import lone_surrogate
from raykit.runtime.logs import logger

HEALTH_PATH = "/health"  # readiness
LIVE_PATH = "/live"  # liveness
MODELS_PATH = "/v1/models"
ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank", "/info", "/metrics", MODELS_PATH, HEALTH_PATH,
          LIVE_PATH)  # fmt: skip
UNCOUNTED_ROUTES = (HEALTH_PATH, LIVE_PATH, "/metrics")  # probes and scrapes
OTHER_ROUTE = "other"  # the metrics label of every path that is not a route
# Serve's default (metrics pushed every 10 s) sees a load step late; a reranker replica is
# cheap to add, so react within seconds (the look-back is `look_back_period_s`).
AUTOSCALE_METRICS_S = 1.0
MODEL_HEALTH_CHECK_S = 2.0  # Serve's default is 10 s
# How often a stopping replica looks for requests still in flight. Serve's default (2 s) is
# slept before the first look, so every scale-down, rollout and shutdown took 2 s per replica.
DRAIN_POLL_S = 0.25
# Options that change nothing in a replica: changing them never restarts one.
DRIVER_ONLY_FIELDS = ("rollout", "detach", "verbose", "host", "port", "route_prefix")


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
    """text-embeddings-inference /rerank (`model` as Infinity's)."""

    model: str | None = None
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
        if api.api_key and path not in (HEALTH_PATH, LIVE_PATH):
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
    """The HTTP surface; every scoring call goes to a model's deployment through its handle.

    `models` maps each served name to its deployment's handle, the default model first."""

    def __init__(self, cfg: ServeConfig, models: dict[str, DeploymentHandle]):
        from prometheus_client import CollectorRegistry
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Histogram as PromHistogram

        from raykit.core.served import parse_models
        from raykit.serving.status import ReplicaStatus

        self.cfg = cfg
        self.served = parse_models(cfg.model, cfg.model_name)
        self.models = models
        self.model_name = self.served[0].name
        self.replicas = ReplicaStatus(
            serve.get_replica_context().app_name, [m.deployment for m in self.served]
        )
        self.api_key = cfg.api_key or os.environ.get("RAYKIT_API_KEY") or None
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
        if route in UNCOUNTED_ROUTES:
            return
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)
        self.ray_requests.inc(tags={"route": route, "status": str(status)})

    def _model(self, requested: str | None) -> tuple[str, DeploymentHandle]:
        """(name, handle) of the model a request names. With one model any name is accepted
        (clients such as Cohere's must send one); with several it must be one of them."""
        if len(self.served) == 1 or requested is None:
            return self.model_name, self.models[self.model_name]
        if requested not in self.models:
            served = ", ".join(self.models)
            raise ApiError(404, f"model: {requested!r} is not served here; served: {served}")
        return requested, self.models[requested]

    async def serving_state(self) -> dict[str, Any]:
        """For `raykit serve --rollout` (a handle call; no route): the options this app was
        built with and the checkpoint each model serves now."""
        sources = {}
        for name, handle in self.models.items():
            sources[name] = (await self._call(handle, "info"))["source"]
        return {"options": asdict(self.cfg), "sources": sources}

    # ------------------------------------------------------------------ routes

    @api.get(HEALTH_PATH)
    async def health(self) -> dict:
        """Readiness: 200 while every model has a running replica (or is scaled to zero on
        purpose), 503 while they load or compile or after they died. It asks Serve's
        controller (cached for a second), never the model."""
        replicas = await self.replicas.get()
        if not all(r.ready(self.cfg.min_replicas or 0) for r in replicas.values()):
            retry_after = {"Retry-After": str(self.cfg.retry_after_s)}
            raise ApiError(503, "the model is loading", retry_after)
        return {"status": "ok"}

    @api.get(LIVE_PATH)
    async def live(self) -> dict:
        """Liveness: this process answers HTTP. Touches neither the model nor the controller."""
        return {"status": "alive"}

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        """The served models, in the OpenAI/Infinity list shape; the first is the default."""
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "owned_by": "raykit", "default": i == 0}
                for i, name in enumerate(self.models)
            ],
        }

    @api.get("/info")
    async def info(self, model: str | None = None) -> dict:
        """The options, the named (or default) model's replica's figures, and per model its
        revision and running replicas; `replicas` sums them."""
        fields = asdict(self.cfg)
        for private in ("api_key", "model", "model_name", "rollout"):  # no path, no secret
            fields.pop(private)
        name, handle = self._model(model)
        replica = await self._call(handle, "info")
        counts = await self.replicas.get()
        per_model = []
        for served in self.served:
            handle = self.models[served.name]
            reply = replica if served.name == name else await self._call(handle, "info")
            per_model.append(
                {
                    "name": served.name,
                    "revision": reply["revision"],
                    "loading": reply["loading"] is not None,
                    "replicas": counts[served.deployment].running,
                }
            )
        fields["dtype_requested"] = fields.pop("dtype")
        for private in ("source", "loading", "model"):
            replica.pop(private)
        return {
            "model_name": name,
            "revision": replica.pop("revision"),
            "replicas": sum(r.running for r in counts.values()),
            "models": per_model,
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
        _, handle = self._model(body.model)
        check_texts(body.query, body.texts, "texts", self.cfg.max_documents)
        truncate = True if body.truncate is None else body.truncate
        logits, _ = await self._score(handle, body.query, body.texts, None, truncate)
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
        name, handle = self._model(body.model)
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        check_texts(body.query, texts, "documents", self.cfg.max_documents)
        logits, tokens = await self._score(handle, body.query, texts, body.max_tokens_per_doc, True)
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
            "model": body.model or name,  # one model: the client's own name is echoed
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
        self,
        handle: DeploymentHandle,
        query: str,
        texts: list[str],
        max_tokens_per_doc: int | None,
        truncate: bool,
    ) -> tuple[list[float], int]:
        reply = await self._call(handle, "score", query, texts, max_tokens_per_doc, truncate)
        if "error" in reply:
            raise ApiError(reply["status"], reply["error"])
        self.documents.inc(len(texts))
        self.tokens.inc(reply["tokens"])
        return reply["logits"], reply["tokens"]

    async def _call(self, handle: DeploymentHandle, method: str, *args: Any) -> Any:
        """Call a model deployment; Serve's failures become JSON 429/503 with Retry-After.

        Scoring is idempotent, so a request lost with a replica (killed, preempted) is sent
        once more, to whichever replica Serve picks; a second loss is a 503."""
        retry_after = {"Retry-After": str(self.cfg.retry_after_s)}
        for attempt in range(2):
            try:
                return await getattr(handle, method).remote(*args)
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
    if cfg.min_replicas is not None and cfg.max_replicas and cfg.cpus_per_replica:
        return cfg
    import ray

    from raykit.runtime.cluster import Capacity, capacity

    if ray.is_initialized():
        cap = capacity(local)
    else:
        cap = Capacity(os.cpu_count() or 1, os.cpu_count() or 1, 0)
    return cfg.sized_for(cap.node_cpus, cap.gpus)


def replica_count(cfg: ServeConfig) -> dict[str, Any]:
    """A fixed count when min == max (no autoscaling metrics then flow to the controller),
    else Serve's autoscaling_config: a short look-back and the configured delays, so a load
    step adds a replica within seconds and an idle server gives it back."""
    if cfg.min_replicas == cfg.max_replicas:
        return {"num_replicas": cfg.max_replicas}
    return {
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas,
            "initial_replicas": max(1, cfg.min_replicas or 0),  # ready to serve when deployed
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
            "look_back_period_s": cfg.look_back_period_s,
            "metrics_interval_s": AUTOSCALE_METRICS_S,
        }
    }


def app_version(bound: ServeConfig) -> str:
    """The deployments' version: what replicas are built from (the options, raykit's
    version), not the checkpoints, which go in user_config. Serve restarts replicas only when
    this changes; a new checkpoint alone is applied in place (`RerankerModel.reconfigure`)."""
    import hashlib
    import json

    import raykit

    fields = {k: v for k, v in asdict(bound).items() if k not in DRIVER_ONLY_FIELDS}
    text = json.dumps([raykit.__version__, fields], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: one model deployment per served model, each with its
    checkpoint in user_config, autoscaling, placement and queue limits from the config."""
    from raykit.core.served import parse_models

    cfg.check_paths()
    cfg = fill_node(cfg)
    return build_served(cfg, parse_models(cfg.model, cfg.model_name))


def build_served(cfg: ServeConfig, served: list[ServedModel]) -> serve.Application:
    """`build_app` for these models: a rollout rebuilds the running app with new paths."""
    from raykit.serving.replica import RerankerModel

    # Replicas see the models' names only, so their arguments stay the same across rollouts.
    bound = dataclasses.replace(cfg, model=[m.name for m in served], model_name=None)
    version = app_version(bound)
    ongoing = cfg.max_ongoing_requests or cfg.max_batch_size
    models = {
        m.name: RerankerModel.options(
            name=m.deployment,
            **replica_count(cfg),
            user_config={"model": m.path},
            ray_actor_options={
                "num_cpus": cfg.cpus_per_replica,
                "num_gpus": 1 if cfg.use_gpu else 0,
            },
            max_ongoing_requests=ongoing,
            max_queued_requests=cfg.max_queued_requests,  # beyond: a JSON 429 from the ingress
            health_check_period_s=MODEL_HEALTH_CHECK_S,  # a dead replica leaves /health soon
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
            logging_config={"enable_access_log": False},
        )
        .options(version=version, _internal=True)
        .bind(bound, m.name)
        for m in served
    }
    # The ingress only waits on the models: no CPU of its own, room for every request the model
    # replicas and their queues can hold (the last line of defence is Serve's own 429).
    capacity = (ongoing * cfg.max_replicas + cfg.max_queued_requests) * len(served)
    return (
        RerankerAPI.options(
            name="reranker",
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=capacity + 16,
            max_queued_requests=capacity,
            backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
            logging_config={"enable_access_log": cfg.access_log},
        )
        .options(version=version, _internal=True)
        .bind(bound, models)
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path` target for Serve config files: `args` are ServeConfig keys. Local models
    are checked here (a trained head, their spec's overrides said) before replicas start; ones
    on S3 or the hub are checked by the replicas that fetch them."""
    cfg = load_config(ServeConfig, **(args or {}))
    check_models(cfg, local_only=True)
    return build_app(cfg)


def check_models(cfg: ServeConfig, local_only: bool = False) -> None:
    """On the driver, each served model (with `local_only`, each in a local folder): it exists
    and has a trained head, and one pair of its limits fits a batch."""
    from raykit.core.loading import resolve_model_path
    from raykit.core.served import parse_models
    from raykit.core.spec import check_reranker

    for served in parse_models(cfg.model, cfg.model_name):
        if local_only and not os.path.isdir(resolve_model_path(served.path)):
            continue
        spec = check_reranker(served.path, cfg)
        if spec and spec.max_len > cfg.max_batch_tokens:
            raise ConfigError(
                f"max_batch_tokens: must be >= the max_len {spec.max_len} of {served.name}"
            )


def check_inputs(cfg: ServeConfig) -> None:
    """Everything that can be checked before Ray starts, each failure one line."""
    cfg.check_paths()
    cfg.check_hardware(cfg.use_gpu)
    if cfg.cpus_per_replica and cfg.max_replicas and cfg.cpus_per_replica * cfg.max_replicas < 1:
        raise ConfigError("cpus_per_replica x max_replicas must be >= 1")
    check_models(cfg)


def start_serve(cfg: ServeConfig) -> None:
    """Serve's controller and its HTTP proxy on host:port (once: a second call only connects)."""
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})


def proxy_address(cfg: ServeConfig) -> tuple[str, int]:
    """Where Serve's HTTP proxy listens: `--host`/`--port`, unless Serve was already running
    on the cluster (a second app, `--detach`), whose proxy keeps its own (said once)."""
    from ray.serve.context import _get_global_client

    options = _get_global_client().http_config
    if (options.host, options.port) != (cfg.host, cfg.port):
        logger.warning(
            f"Serve is already running on this cluster, its proxy at {options.host}:"
            f"{options.port}: --host {cfg.host} --port {cfg.port} are ignored"
        )
    return options.host, options.port


def run_serve(
    cfg: ServeConfig, stop: threading.Event | None = None, launched_at: float | None = None
) -> None:
    """Start Serve's proxy on host:port, deploy the app, and block until Ctrl-C / SIGTERM
    (or, with `detach`, return and leave the app running on the cluster). `launched_at`: when
    the user launched the command (the CLI's process start), which "ready in" counts from, so
    that it includes Ray's start; by default, this call."""
    import ray

    from raykit.core.precision import describe_precision
    from raykit.runtime.cluster import init_ray

    started = launched_at or time.time()
    check_inputs(cfg)
    started_ray = not ray.is_initialized()
    local = init_ray(cfg.ray_cpus())
    if cfg.detach and local:
        if started_ray:
            ray.shutdown()
        raise ConfigError(
            "detach: no running Ray cluster to leave the app on (this command's own local "
            "instance stops when it returns); start one with `ray start --head`, or set "
            "RAY_ADDRESS to join one (RAY_ADDRESS=auto: the instance of a `raykit serve` "
            "running on this machine)"
        )
    cfg = fill_node(cfg, local)
    stop = stop or threading.Event()
    start_serve(cfg)
    host, port = proxy_address(cfg)
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
            f"ready in {time.time() - started:.1f} s: {replicas} replica(s) x "
            f"{each}, {describe_precision(cfg.precision, device)}, {compiled}"
        )
        logger.info(
            f"serving {', '.join(cfg.model)} at http://{host}:{port}{prefix}/v1/rerank "
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

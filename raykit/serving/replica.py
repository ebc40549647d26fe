"""The model replica: one Serve deployment per served model, autoscaled, one GPU or
`cpus_per_replica` CPUs each.

The checkpoint comes in the deployment's `user_config` ({"model": PATH}), not in its init
arguments, so a new checkpoint is a lightweight config update that Serve applies in place
(`reconfigure`), replica by replica, without restarting one: the replica loads (and compiles)
the new model beside the old one, which keeps serving, and switches when it is ready. A request
is tokenised and scored wholly by the model that was current when it arrived, so every
response is wholly the old model's or wholly the new one's.

Each loaded model has its own token-budgeted queue (`raykit.serving.queue.BatchQueue`), so
concurrent requests share forward passes; one thread runs every forward pass of the replica
and one tokenises, so the event loop only moves requests in and out of the queues.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from ray import serve
from ray.serve.metrics import Counter

from raykit.config import ServeConfig
from raykit.runtime.logs import logger


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class LoadedModel:
    """A model ready to score, the queue that feeds it, and where it came from."""

    engine: Any  # raykit.core.engine.InferenceEngine (imported in the replica only)
    queue: Any  # raykit.serving.queue.BatchQueue
    source: str  # the path or URI as configured (never shown to clients)
    revision: str
    startup: dict[str, float]


@serve.deployment
class RerankerModel:
    """Scores (query, documents) requests with the current model; swaps models in place."""

    def __init__(self, cfg: ServeConfig, name: str):
        from raykit.runtime.console import quiet_ray

        quiet_ray()  # Ray's deprecation notices in this actor, as on the driver
        self.cfg, self.name = cfg, name
        self.current: LoadedModel | None = None
        self.loading: str | None = None  # the source being loaded beside the current model
        self.rollout_error: str | None = None
        self.model_thread = ThreadPoolExecutor(1, "raykit-model")
        self.tokenizer_thread = ThreadPoolExecutor(1, "raykit-tokenizer")
        self.loader_thread = ThreadPoolExecutor(1, "raykit-loader")
        self._swap_task: asyncio.Task | None = None
        # Serve tags these with the deployment, which is one per model.
        self.metric_documents = Counter("raykit_documents", "Documents scored.")
        self.metric_tokens = Counter("raykit_tokens", "Tokens scored.")
        self.metric_forwards = Counter("raykit_forward_passes", "Model forward passes.")

    # ------------------------------------------------------------------ loading and rollout

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config: before the replica serves
        (the first model: awaited), and on every config update (a new model: loaded in the
        background while the current one serves)."""
        source = config["model"]
        loop = asyncio.get_running_loop()
        if self.current is None:
            self.current = await loop.run_in_executor(self.loader_thread, self._load, source)
            return
        if source in (self.current.source, self.loading):
            return
        self.loading = source
        self._swap_task = loop.create_task(self._swap(source))

    async def _swap(self, source: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(self.loader_thread, self._load, source)
        except Exception as exc:  # the current model keeps serving; /info says why
            self.rollout_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            logger.error(f"{self.name}: the new model failed to load, still serving the old one: "
                         f"{self.rollout_error}")  # fmt: skip
            return
        finally:
            if self.loading == source:
                self.loading = None
        old, self.current, self.rollout_error = self.current, loaded, None
        logger.info(f"{self.name}: now serving revision {loaded.revision} (was {old.revision})")

    def _load(self, source: str) -> LoadedModel:
        """Load (and compile) `source`, with its start-up split."""
        from raykit.core.engine import InferenceEngine
        from raykit.serving.queue import BatchQueue

        cfg = self.cfg
        started = time.perf_counter()
        use_gpu = cfg.use_gpu and _cuda_available()
        # A package kept for this checkpoint is restored without loading the model.
        compiles = cfg.compiles("cuda" if use_gpu else "cpu")
        engine = InferenceEngine.from_config(
            cfg,
            source,
            use_gpu=use_gpu,
            threads=cfg.cpus_per_replica,
            max_batch_size=cfg.max_batch_size,
            compiled_cache=cfg.compile_cache_dir() if compiles else None,
        )
        if compiles:
            engine.compile_model(cfg.compile_cache_dir())
        ready_at = time.perf_counter()
        revision = engine.revision or source
        compiling = sum(engine.compile_split.values())
        startup = {"load_s": ready_at - started - compiling, **engine.compile_split}
        split = ", ".join(f"{k[:-2].replace('_', '-')} {v:.1f} s" for k, v in startup.items())
        took = ready_at - started
        logger.info(f"{self.name}: revision {revision} ready in {took:.1f} s ({split})")
        queue = BatchQueue(
            lambda pairs: self._forward(engine, pairs),
            cfg.max_batch_size,
            cfg.max_batch_tokens,
            self.model_thread,
            cfg.batch_wait_timeout_s,
        )
        return LoadedModel(engine, queue, source, revision, startup)

    # ------------------------------------------------------------------ scoring

    @staticmethod
    def _tokenize(
        engine: Any, query: str, texts: list[str], max_tokens_per_doc: int | None, truncate: bool
    ) -> list[dict[str, list[int]]] | str:
        """Encodings of every pair, or (with `truncate` False) a message naming the first pair
        that the engine's limits would cut: the very encoding that will be scored (a decoder's
        whole prompt) is measured."""
        queries = [query] * len(texts)
        encodings = engine.tokenize(queries, texts, passage_max_len=max_tokens_per_doc)
        if not truncate:
            over = engine.first_cut(queries, texts, encodings)
            if over is not None:
                index, length = over
                what = "prompt" if engine.template is not None else "pair"
                return (
                    f"texts[{index}]: the {what} is {length} tokens, over the model's limits "
                    f"(max_len {engine.max_len}, query_max_len "
                    f"{engine.query_max_len or engine.max_len // 2}); send "
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
        """{"logits": [...], "tokens": n, "revision": ...}, or {"status": 413, "error": ...}."""
        model = self.current  # this request is wholly this model's, whatever swaps meanwhile
        assert model is not None  # reconfigure ran before the replica was routed to
        loop = asyncio.get_running_loop()
        encodings = await loop.run_in_executor(
            self.tokenizer_thread,
            self._tokenize,
            model.engine,
            query,
            texts,
            max_tokens_per_doc,
            truncate,
        )
        if isinstance(encodings, str):
            return {"status": 413, "error": encodings}
        logits = await model.queue.score(encodings)
        tokens = sum(len(e["input_ids"]) for e in encodings)
        self.metric_documents.inc(len(texts))
        self.metric_tokens.inc(tokens)
        return {"logits": logits.tolist(), "tokens": tokens, "revision": model.revision}

    def _forward(self, engine: Any, pairs: list[dict[str, list[int]]]) -> np.ndarray:
        """Score one batch from a queue (the engine chunks it by length and token budget)."""
        before = engine.stats.forward_passes
        scores = engine.score_encodings(pairs)
        self.metric_forwards.inc(engine.stats.forward_passes - before)
        return scores

    # ------------------------------------------------------------------ status

    async def info(self) -> dict[str, Any]:
        model = self.current
        assert model is not None
        engine, spec = model.engine, model.engine.spec
        return {
            "model": self.name,
            "source": model.source,  # the driver's rollout reads it; the ingress drops it
            "revision": model.revision,
            "loading": self.loading,
            "rollout_error": self.rollout_error,
            "startup": {k: round(v, 2) for k, v in model.startup.items()},
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
            "queued_requests": len(model.queue.waiting),
            **asdict(model.queue.stats),
        }

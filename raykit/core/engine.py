"""The one inference engine: every path that scores (query, passage) pairs goes through it.

`InferenceEngine` owns what a forward pass needs: the model (a local folder, a URI or a hub id),
device, precision, CPU threads, pad id, tokenisation with the query/passage limits, chunking of
length-sorted pairs under one token budget (`forward_token_budget`), and the forward pass.
`Reranker` (the Python API), the `raykit score` actors, the Serve replicas, mine's false-negative
filter, `evaluate`, `mix` and training-time evaluation all call it, so a pair gets the same score
whichever path it takes.

Precision (`--dtype`): `auto` is fp32 on CPU (scores equal a plain fp32 forward pass) and
bf16 (fp16 where bf16 is unsupported) on GPU. A model the engine loads itself is cast to
bf16/fp16 (on this project's reference CPU, bf16 weights measured ~4% faster than autocast),
all but its classification head, which stays fp32 so that scores do not tie. A model it is
handed (training-time evaluation) runs under autocast and is never modified.
`int8` is torchao's dynamic int8 quantisation of the linear layers (opt-in).

`compile_model` compiles with inductor's freezing (weights become constants, so GEMMs use
prepacked weights and pointwise ops fuse): on this project's reference CPU +15% pairs/s at fp32
and +11% at bf16, scores within 1e-7 of eager at fp32. It costs ~30-50 s, so only long-lived
processes (Serve replicas) do it by default; with a cache folder an encoder's compiled package
is kept there and the next replica restores it in well under a second (`core/compiled.py`);
`load(compiled_cache=...)` restores such a package without loading the model at all.

"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from raykit.core.batching import CHUNK_COST_TOKENS, chunk_by_length, pad_encodings
from raykit.core.head import head_scores
from raykit.core.precision import keep_head_float32, quantize_int8, resolve_dtype, torch_dtype
from raykit.core.prompts import tokenize_for
from raykit.core.served import model_revision
from raykit.core.spec import RerankerSpec, SpecRequest, check_token_ids, resolve_spec
from raykit.core.tokenize import Encoding
from raykit.runtime.logs import logger, quiet_noisy_loggers
from raykit.runtime.storage import is_uri

if TYPE_CHECKING:
    import torch

quiet_noisy_loggers()  # also for library use without `setup_console`


def _packageable(path: str, spec: RerankerSpec, precision: str, request: SpecRequest) -> bool:
    """Whether the model at `path` could have a kept package that restores without it: an
    encoder in a plain local folder (an adapter's base is outside the folder the package is
    keyed by, remote code outside it too), in a precision that is packaged."""
    from raykit.core.adapters import is_adapter_dir

    return (
        spec.template is None
        and os.path.isdir(path)
        and not is_adapter_dir(path)
        and not request.trust_remote_code
        and precision != "int8"
    )


_WARM_UP_TEXT = "the quick brown fox jumps over the lazy dog near the river bank"
WARM_UP_PAIRS = [
    [("a warm-up query", _WARM_UP_TEXT[:9])],
    [("a warm-up query", _WARM_UP_TEXT[:30])] * 2,
    [("a warm-up query", _WARM_UP_TEXT[:n]) for n in (9, 30, 62)],
]


@dataclass
class EngineStats:
    """What the engine has done since it started (for /info, logs and benchmarks)."""

    forward_passes: int = 0
    pairs: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    forward_s: float = 0.0

    @property
    def padding_ratio(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


class InferenceEngine:
    """Scores (query, passage) pairs: tokenise, sort by length, chunk, pad, forward.

    Build it with `load` (the engine owns the model) or hand it a model (training-time
    evaluation: the model is used as it is, under autocast when `autocast_dtype` is given)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        precision: str = "float32",
        autocast_dtype: torch.dtype | None = None,
        spec: RerankerSpec | None = None,
        token_budget: int = 4096,
        max_batch_size: int = 64,
        inference_mode: bool = True,
    ):
        import torch

        self.model = model
        # False: `no_grad` instead; an FSDP model's gathered parameters, made under inference
        # mode, could not be used for training afterwards.
        self.inference_mode = inference_mode
        # How the model scores: a decoder's prompt (`template`, scored logit(yes) - logit(no))
        # or an encoder's one logit, and the token limits.
        self.spec = spec = spec or RerankerSpec()
        self.template = spec.template
        self.yes_no = spec.yes_no_ids(tokenizer)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = autocast_dtype
        self.max_len, self.query_max_len, self.passage_max_len = (
            spec.max_len,
            spec.query_max_len,
            spec.passage_max_len,
        )
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.chunk_cost = CHUNK_COST_TOKENS.get(self.device.type, CHUNK_COST_TOKENS["cuda"])
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.stats = EngineStats()
        self.compiled = False
        self.revision: str | None = None  # the checkpoint's content hash, when loaded from a folder
        self.local_dir: str | None = None  # that folder (a package is keyed by all its bytes)
        self.source: str | None = None  # the URI it was copied from, for a model on remote storage
        # A compiled scoring function (batch -> scores) that replaces `head_scores(self.model)`:
        # an AOTInductor package, see `raykit.core.compiled`.
        self.scorer: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
        self.compile_split: dict[str, float] = {}  # compile_s or restore_s, and warm-up_s

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        threads: int | None = None,
        request: SpecRequest | None = None,
        allow_untrained_head: bool = False,
        allow_slow_precision: bool = False,
        announce: Callable[[str], None] | None = None,
        compiled_cache: str | None = None,
        **options: Any,
    ) -> InferenceEngine:
        """Load `model` (local folder, s3://..., hub id or embedded name) ready to score.

        `threads` sets torch's CPU threads (on CPU only); `request` holds the explicit model
        kind, decoder prompt and token limits, which override the model's saved spec (each
        override reported through `announce`); `options` are the constructor's `token_budget`
        and `max_batch_size`, or fields of a `SpecRequest` when `request` is not given
        (`max_len=64, instruction=...`, `trust_remote_code`). A model whose classification head
        would be created at random is refused unless `allow_untrained_head`, and a bf16/fp16 `dtype`
        the CPU only emulates unless `allow_slow_precision`. With `compiled_cache`, an encoder
        whose compiled package is kept there with its receipt is restored from it alone: the
        model's weights and classes are never loaded (a replica's start), and `model` is None."""
        import torch

        from raykit.core.loading import load_model_and_tokenizer, local_model_path
        from raykit.runtime.logs import quiet_libraries

        quiet_libraries()  # no weight-loading reports from every actor and replica

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads and device.type == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        precision = resolve_dtype(dtype, device.type, allow_slow_precision)
        spec_fields = {k: options.pop(k) for k in list(options) if k in SpecRequest.fields()}
        if request is None:
            request = SpecRequest(**spec_fields)
        elif spec_fields:
            raise TypeError(f"pass {', '.join(spec_fields)} in `request`")
        path = local_model_path(model)
        spec = resolve_spec(path, request, announce)
        source = model if is_uri(model) else None
        if compiled_cache and _packageable(path, spec, precision, request):
            engine = cls._restored(path, spec, request, device, precision, compiled_cache, options)
            if engine is not None:
                engine.source = source
                return engine
        hf_model, tokenizer = load_model_and_tokenizer(
            path,
            request.trust_remote_code,
            spec.template is not None,
            allow_untrained_head=allow_untrained_head,
            name=model,
        )
        check_token_ids(path, spec, tokenizer)
        hf_model.eval()
        if precision == "int8":
            hf_model = quantize_int8(hf_model)
        elif torch_dtype(precision) is not None:
            hf_model = hf_model.to(torch_dtype(precision))
            if spec.template is None:  # a decoder's head may share the embedding's weights
                keep_head_float32(hf_model)
        hf_model.to(device)
        engine = cls(hf_model, tokenizer, device=device, precision=precision, spec=spec, **options)
        if os.path.isdir(path):
            engine.revision, engine.local_dir = model_revision(path), path
        engine.source = source
        return engine

    @classmethod
    def _restored(
        cls,
        path: str,
        spec: RerankerSpec,
        request: SpecRequest,
        device: torch.device,
        precision: str,
        cache_dir: str,
        options: dict[str, Any],
    ) -> InferenceEngine | None:
        """An engine on the package kept for the checkpoint at `path`, or None (none kept)."""
        from raykit.core.compiled import restore_kept
        from raykit.core.loading import load_tokenizer

        tokenizer = load_tokenizer(path, request.trust_remote_code)
        engine = cls(None, tokenizer, device=device, precision=precision, spec=spec, **options)
        engine.revision, engine.local_dir = model_revision(path), path
        checks = engine._warm_up_batches()
        key = engine._package_key(checks)
        engine.scorer, split = restore_kept(key, checks, cache_dir, precision)
        if engine.scorer is None:
            return None
        engine._warmed_up(split)
        return engine

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        model: str,
        *,
        use_gpu: bool,
        threads: float | None,
        max_batch_size: int,
        announce: Callable[[str], None] | None = None,
        compiled_cache: str | None = None,
    ) -> InferenceEngine:
        """`load` with the shared option groups of a command's config (precision, model
        loading, token limits, forward_token_budget); `threads` None keeps torch's own."""
        return cls.load(
            model,
            device="cuda" if use_gpu else "cpu",
            dtype=cfg.precision,
            threads=None if use_gpu or not threads else max(1, int(threads)),
            request=SpecRequest.of(cfg),
            allow_untrained_head=cfg.allow_untrained_head,
            allow_slow_precision=cfg.allow_slow_precision,
            announce=announce,
            token_budget=cfg.forward_token_budget,
            max_batch_size=max_batch_size,
            compiled_cache=compiled_cache,
        )

    def compile_model(self, cache_dir: str | None = None, build: bool = True) -> bool:
        """Compile the model before it scores, so no request waits for a compile. With
        `cache_dir`, an encoder loaded from a folder is compiled ahead of time into a package
        kept there (`raykit.core.compiled`): the next process with the same checkpoint, torch,
        precision and CPU loads it in a fraction of a second. Otherwise, or if exporting fails,
        `torch.compile` (dynamic shapes, inductor freezing) compiles it on the shapes scoring
        meets. On failure (no C++ compiler, an op inductor cannot take) it logs why and keeps
        the eager model: returns whether the model is compiled. Without `build`, only a package
        already kept in `cache_dir` (or beside a remote model) is used; nothing compiles."""
        if self.compiled:  # restored by `load(compiled_cache=...)`
            return True
        if cache_dir and self._can_package():
            try:
                return self._compile_package(cache_dir, build)
            except Exception as exc:  # export or AOTInductor cannot take it: torch.compile
                logger.warning(
                    f"ahead-of-time compile failed, using torch.compile: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}"
                )
        return self._torch_compile() if build else False

    def _can_package(self) -> bool:
        """An encoder from a folder (its content keys the package), weights in the dtype it
        runs (no autocast), not torchao's int8."""
        return (
            self.template is None
            and self.local_dir is not None
            and self.autocast_dtype is None
            and self.precision != "int8"
        )

    def _package_key(self, checks: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        from raykit.core.compiled import content_digest, key_parts

        assert self.local_dir is not None
        digest = content_digest(self.local_dir)
        return key_parts(digest, self.precision, self.device, sorted(checks[-1]), self.max_len)

    def _compile_package(self, cache_dir: str, build: bool = True) -> bool:
        from raykit.core.compiled import load_or_build, shared_package_dir

        checks = self._warm_up_batches()
        shared = shared_package_dir(self.source) if self.source else None
        self.scorer, split = load_or_build(
            self.model, self._package_key(checks), checks, cache_dir, self.precision, shared, build
        )
        if self.scorer is None:
            logger.info("no compiled package of this model kept yet: scoring eagerly")
            return False
        self._warmed_up(split, shared)
        return True

    def _warmed_up(self, split: dict[str, float], shared: str | None = None) -> None:
        """Warm the package up and say how it was had (`split`: its restore/fetch/compile_s)."""
        started = time.perf_counter()
        self.warm_up()
        self.stats = EngineStats()  # the warm-up is not traffic
        self.compile_split = {**split, "warm_up_s": time.perf_counter() - started}
        how = {"restore_s": "restored", "fetch_s": f"fetched from {shared}"}.get(
            next(iter(split)), "compiled ahead of time"
        )
        logger.info(f"{how} the model in {sum(self.compile_split.values()):.1f} s")
        self.compiled = True

    def _warm_up_batches(self) -> list[dict[str, torch.Tensor]]:
        """The warm-up pairs as padded batches on the device (1 pair, 2 alike, 3 of different
        lengths): the package's check pairs, the last its export sample."""
        batches = []
        for pairs in WARM_UP_PAIRS:
            encodings = self.tokenize([q for q, _ in pairs], [p for _, p in pairs])
            batch = pad_encodings(encodings, self.pad_id, left=self.template is not None)
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return batches

    def _torch_compile(self) -> bool:
        import torch
        import torch._inductor.config as inductor_config

        eager = self.model
        # Process-wide, and read when the graph is compiled (a `torch.compile(options=)` patch
        # is not): without freezing, compiling measured slower than eager on CPU.
        inductor_config.freezing = True
        self.model = torch.compile(eager, dynamic=True)
        started = time.perf_counter()
        try:
            self.warm_up()
        except Exception as exc:  # any compile failure leaves eager scoring
            logger.warning(
                f"torch.compile failed, scoring eagerly: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            )
            self.model = eager
            return False
        finally:
            self.stats = EngineStats()  # the warm-up is not traffic
        self.compile_split = {"compile_s": time.perf_counter() - started}
        logger.info(f"compiled the model in {time.perf_counter() - started:.0f} s")
        self.compiled = True
        return True

    def warm_up(self) -> None:
        """Score a few made-up pairs: one alone (batch size 1 is its own graph), two of equal
        length (no padding) and three of different lengths (padding)."""
        for pairs in WARM_UP_PAIRS:
            self.score_pairs(pairs)

    # ------------------------------------------------------------------ scoring

    def tokenize(
        self, queries: Sequence[str], passages: Sequence[str], passage_max_len: int | None = None
    ) -> list[Encoding]:
        """Encodings under the engine's limits; `passage_max_len` may cut passages further."""
        limits = [n for n in (self.passage_max_len, passage_max_len) if n]
        return tokenize_for(
            self.tokenizer,
            self.template,
            queries,
            passages,
            self.max_len,
            self.query_max_len,
            min(limits, default=None),
        )

    def first_cut(
        self, queries: Sequence[str], passages: Sequence[str], encodings: Sequence[Encoding]
    ) -> tuple[int, int] | None:
        """(index, untruncated length) of the first pair whose `encodings` (from `tokenize`)
        were cut by a limit, or None: the same tokenisation, without limits, compared."""
        unlimited = 1 << 30
        full = tokenize_for(
            self.tokenizer, self.template, queries, passages, unlimited, unlimited, None
        )
        for index, (whole, cut) in enumerate(zip(full, encodings, strict=True)):
            if len(whole["input_ids"]) != len(cut["input_ids"]):
                return index, len(whole["input_ids"])
        return None

    def score_pairs(self, pairs: Sequence[Sequence[str]]) -> np.ndarray:
        """Raw scores (logits) of (query, passage) pairs, in input order."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        return self.score_encodings(self.tokenize([q for q, _ in pairs], [p for _, p in pairs]))

    def score_encodings(self, encodings: Sequence[Encoding]) -> np.ndarray:
        """Raw scores of tokenised pairs, in input order: sorted by length and cut into chunks
        of at most `max_batch_size` pairs and `token_budget` padded tokens that pad little."""
        scores = np.zeros(len(encodings), dtype=np.float32)
        lengths = [len(e["input_ids"]) for e in encodings]
        for chunk in chunk_by_length(
            lengths, self.token_budget, self.max_batch_size, self.chunk_cost
        ):
            batch = pad_encodings(
                [encodings[i] for i in chunk], self.pad_id, left=self.template is not None
            )
            scores[chunk] = self.forward(batch)
        return scores

    def forward(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Float32 scores of one padded batch."""
        import torch

        started = time.perf_counter()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        enabled = self.autocast_dtype is not None
        autocast = torch.autocast(self.device.type, self.autocast_dtype, enabled=enabled)
        grad_off = torch.inference_mode() if self.inference_mode else torch.no_grad()
        with grad_off, autocast:
            if self.scorer is not None:
                scores = self.scorer(batch).float().cpu().numpy()
            else:
                scores = head_scores(self.model, batch, self.yes_no).float().cpu().numpy()
        mask = batch["attention_mask"]
        self.stats.forward_passes += 1
        self.stats.pairs += len(scores)
        self.stats.tokens += int(mask.sum())
        self.stats.padded_tokens += mask.numel()
        self.stats.forward_s += time.perf_counter() - started
        return scores

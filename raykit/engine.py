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

`compile_model` runs the model through `torch.compile` with inductor's freezing (weights become
constants, so GEMMs use prepacked weights and pointwise ops fuse): on this project's reference
CPU +15% pairs/s at fp32 and +11% at bf16, scores within 1e-7 of eager at fp32. It costs ~50 s
per process, so only long-lived processes (Serve replicas) do it by default.

Tokenisation helpers import no torch, so Ray Data's tokenising tasks stay light.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from raykit.console import quiet_noisy_loggers
from raykit.prompts import PromptTemplate, resolve_template, token_id, tokenize_prompts

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("raykit")
quiet_noisy_loggers()  # also for library use without `setup_console`

DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
Encoding = dict[str, list[int]]  # input_ids (+ token_type_ids) of one pair


# ---------------------------------------------------------------------------- tokenisation


def _cut_to_tokens(tokenizer: Any, texts: Sequence[str], limit: int) -> list[str]:
    """Cut each text after its first `limit` tokens (using the fast tokenizer's offsets)."""
    offsets = tokenizer(
        list(texts), add_special_tokens=False, truncation=True, max_length=limit,
        return_offsets_mapping=True,
    )["offset_mapping"]  # fmt: skip
    return [
        text[: spans[-1][1]] if spans else text for text, spans in zip(texts, offsets, strict=True)
    ]


def tokenize_pairs(
    tokenizer: Any,
    queries: Sequence[str],
    passages: Sequence[str],
    max_len: int,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
) -> list[Encoding]:
    """Encode (query, passage) pairs without padding; the passage is truncated first.

    The query is cut to `query_max_len` tokens (default max_len // 2) so that a long query never
    pushes the passage out entirely, the passage to `passage_max_len`, and then the pair to
    `max_len` on the passage side.
    """
    room = max_len - tokenizer.num_special_tokens_to_add(pair=True) - 1
    query_max_len = min(query_max_len or max_len // 2, room)
    unique = list(dict.fromkeys(queries))
    cut = dict(zip(unique, _cut_to_tokens(tokenizer, unique, query_max_len), strict=True))
    queries = [cut[q] for q in queries]
    if passage_max_len and passage_max_len < max_len:
        passages = _cut_to_tokens(tokenizer, passages, passage_max_len)
    batch = tokenizer(list(queries), list(passages), truncation="only_second", max_length=max_len)
    keys = [k for k in ("input_ids", "token_type_ids") if k in batch]
    return [{k: batch[k][i] for k in keys} for i in range(len(queries))]


# The fixed cost of one forward pass, in tokens: what a further chunk must save in padding.
# Measured on a 2-core CPU with MiniLM (20-document CQA batches of 40 pairs, 1 thread): greedy
# 4096-token chunks padded 37% and ran 19.0 pairs/s; chunking at a cost of 16-64 tokens padded
# 2-6% and ran 29.4-29.8 pairs/s. On a GPU a forward pass costs far more (kernel launches).
CHUNK_COST_TOKENS = {"cpu": 32, "cuda": 1024}


def chunk_by_length(
    lengths: Sequence[int], token_budget: int, max_items: int | None = None,
    chunk_cost: int = CHUNK_COST_TOKENS["cpu"],
) -> list[list[int]]:  # fmt: skip
    """Split indices into chunks of similar length: each chunk pads to its own longest pair,
    stays within `token_budget` padded tokens (a single longer pair gets a chunk of its own) and
    `max_items` pairs, and together they minimise padded tokens + `chunk_cost` per chunk.

    Exact, by dynamic programming over the pairs sorted longest first (a chunk is always a run
    of that order); chunks come longest first."""
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    sorted_lengths = np.asarray(lengths, dtype=np.int64)[order]
    most = min(n, max_items or n)
    best = np.zeros(n + 1)  # best[j]: least cost of the first j pairs
    start = np.zeros(n + 1, dtype=np.int64)  # start[j]: where the last chunk of that begins
    for j in range(1, n + 1):
        low = max(0, j - most)
        size = j - np.arange(low, j)
        padded = sorted_lengths[low:j] * size
        costs = np.where((padded <= token_budget) | (size == 1),
                         best[low:j] + padded + chunk_cost, np.inf)  # fmt: skip
        k = int(np.argmin(costs))  # the first minimum: the biggest chunk on ties
        best[j], start[j] = costs[k], low + k
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[start[j] : j].tolist())
        j = int(start[j])
    return chunks[::-1]


def pad_encodings(
    encodings: Iterable[dict[str, Sequence[int]]], pad_id: int, left: bool = False
) -> dict[str, Any]:
    """Pad token ids (on the right, or on the `left` for decoders, whose score is read at the
    last position) into int64 tensors with an attention mask."""
    import torch

    encodings = list(encodings)
    width = max(len(e["input_ids"]) for e in encodings)
    keys = ["input_ids"] + (["token_type_ids"] if "token_type_ids" in encodings[0] else [])
    arrays = {k: np.full((len(encodings), width), pad_id if k == "input_ids" else 0, np.int64)
              for k in keys}  # fmt: skip
    arrays["attention_mask"] = np.zeros((len(encodings), width), np.int64)
    for row, enc in enumerate(encodings):
        n = len(enc["input_ids"])
        span = slice(width - n, width) if left else slice(0, n)
        for k in keys:
            arrays[k][row, span] = enc[k]
        arrays["attention_mask"][row, span] = 1
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


# ---------------------------------------------------------------------------- precision


def resolve_dtype(requested: str, device_type: str) -> str:
    """The precision a model will run at: `auto` becomes fp32 on CPU, bf16 (or fp16) on GPU.

    float16 on CPU is emulated and slower than fp32, so it falls back to fp32 with a warning."""
    import torch

    if requested not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {requested!r}")
    if requested == "auto":
        if device_type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if requested == "float16" and device_type == "cpu":
        logger.warning("float16 on CPU is emulated and slow: running float32 (use bfloat16)")
        return "float32"
    return requested


def torch_dtype(name: str) -> torch.dtype | None:
    """The floating dtype of a precision name; None for float32 and int8 (fp32 activations)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


HEAD_NAMES = ("classifier", "score")  # encoders' and decoders' sequence-classification heads


def _inputs_to_float32(module: Any, args: tuple) -> tuple:
    return tuple(a.float() if getattr(a, "is_floating_point", lambda: False)() else a for a in args)


def keep_head_float32(model: Any) -> None:
    """Run the classification head of a bf16/fp16 model in float32.

    A logit rounded to bf16 keeps 8 significant bits, so most candidates of a query tie: 362
    distinct scores for 2,090 CQA dev pairs, NDCG@10 -0.0034 against fp32. With the head in
    fp32: 2,074 distinct scores, NDCG@10 +0.0005, at no measurable cost (one small layer)."""
    import torch

    head = next((getattr(model, name) for name in HEAD_NAMES
                 if isinstance(getattr(model, name, None), torch.nn.Module)), None)  # fmt: skip
    if head is not None:
        head.float()
        head.register_forward_pre_hook(_inputs_to_float32)


def quantize_int8(model: Any) -> Any:
    """torchao's dynamic int8 quantisation of every linear layer (weights and activations)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise ImportError("dtype int8 needs torchao: pip install 'raykit[int8]'") from None
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


# ---------------------------------------------------------------------------- the engine


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
        max_len: int = 512,
        query_max_len: int | None = None,
        passage_max_len: int | None = None,
        token_budget: int = 4096,
        max_batch_size: int = 64,
        template: PromptTemplate | None = None,
        inference_mode: bool = True,
    ):
        import torch

        self.model = model
        # False: `no_grad` instead; an FSDP model's gathered parameters, made under inference
        # mode, could not be used for training afterwards.
        self.inference_mode = inference_mode
        # A decoder reranker: prompts from `template`, scored logit(yes) - logit(no).
        self.template = template
        if template is not None:
            self.yes_id = token_id(tokenizer, template.yes_token, "yes_token")
            self.no_id = token_id(tokenizer, template.no_token, "no_token")
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = autocast_dtype
        self.max_len, self.query_max_len, self.passage_max_len = (
            max_len, query_max_len, passage_max_len
        )  # fmt: skip
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.chunk_cost = CHUNK_COST_TOKENS.get(self.device.type, CHUNK_COST_TOKENS["cuda"])
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.stats = EngineStats()
        self.compiled = False

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        threads: int | None = None,
        trust_remote_code: bool = False,
        model_kind: str = "auto",
        template: str | None = None,
        instruction: str | None = None,
        yes_token: str | None = None,
        no_token: str | None = None,
        **options: Any,
    ) -> InferenceEngine:
        """Load `model` (local folder, s3://..., hub id or embedded name) ready to score.

        `threads` sets torch's CPU threads (on CPU only); `model_kind`, `template`,
        `instruction`, `yes_token` and `no_token` choose how a decoder is prompted (see
        `raykit.prompts`); `options` are the constructor's token limits, `token_budget` and
        `max_batch_size`."""
        import torch

        from raykit.console import quiet_libraries
        from raykit.model import load_model_and_tokenizer, local_model_path

        quiet_libraries()  # no weight-loading reports from every actor and replica

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads and device.type == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        precision = resolve_dtype(dtype, device.type)
        path = local_model_path(model)
        prompt = decoder_template(path, trust_remote_code, model_kind, template, instruction,
                                  yes_token, no_token)  # fmt: skip
        hf_model, tokenizer = load_model_and_tokenizer(path, trust_remote_code, prompt is not None)
        hf_model.eval()
        if precision == "int8":
            hf_model = quantize_int8(hf_model)
        elif torch_dtype(precision) is not None:
            hf_model = hf_model.to(torch_dtype(precision))
            if prompt is None:  # a decoder's head may share the embedding's weights
                keep_head_float32(hf_model)
        hf_model.to(device)
        return cls(hf_model, tokenizer, device=device, precision=precision, template=prompt,
                   **options)  # fmt: skip

    @classmethod
    def from_config(
        cls, cfg: Any, model: str, *, use_gpu: bool, threads: float | None, max_batch_size: int
    ) -> InferenceEngine:
        """`load` with the shared option groups of a command's config (precision, token
        limits, forward_token_budget, trust_remote_code); `threads` None keeps torch's own."""
        return cls.load(
            model, device="cuda" if use_gpu else "cpu", dtype=cfg.precision,
            threads=None if use_gpu or not threads else max(1, int(threads)),
            trust_remote_code=cfg.trust_remote_code, model_kind=cfg.model_kind,
            template=cfg.template, instruction=cfg.instruction, yes_token=cfg.yes_token,
            no_token=cfg.no_token, max_len=cfg.max_len,
            query_max_len=cfg.query_max_len, passage_max_len=cfg.passage_max_len,
            token_budget=cfg.forward_token_budget, max_batch_size=max_batch_size,
        )  # fmt: skip

    def compile_model(self) -> bool:
        """`torch.compile` the model (dynamic shapes, inductor freezing) and compile it now on
        the shapes scoring meets (one pair; several, padded and not), so no request waits for a
        compile. On failure (no C++ compiler, an op inductor cannot take) it logs why and keeps
        the eager model: returns whether the model is compiled."""
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
            logger.warning(f"torch.compile failed, scoring eagerly: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}")  # fmt: skip
            self.model = eager
            return False
        finally:
            self.stats = EngineStats()  # the warm-up is not traffic
        logger.info(f"compiled the model in {time.perf_counter() - started:.0f} s")
        self.compiled = True
        return True

    def warm_up(self) -> None:
        """Score a few made-up pairs: one alone (batch size 1 is its own graph), two of equal
        length (no padding) and three of different lengths (padding)."""
        text = "the quick brown fox jumps over the lazy dog near the river bank"
        passages = [text[:n] for n in (9, 30, 62)]
        self.score_pairs([("a warm-up query", passages[0])])
        self.score_pairs([("a warm-up query", passages[1])] * 2)
        self.score_pairs([("a warm-up query", p) for p in passages])

    # ------------------------------------------------------------------ scoring

    def tokenize(
        self, queries: Sequence[str], passages: Sequence[str], passage_max_len: int | None = None
    ) -> list[Encoding]:
        """Encodings under the engine's limits; `passage_max_len` may cut passages further."""
        limits = [n for n in (self.passage_max_len, passage_max_len) if n]
        return tokenize_for(self.tokenizer, self.template, queries, passages, self.max_len,
                            self.query_max_len, min(limits, default=None))  # fmt: skip

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
        for chunk in chunk_by_length(lengths, self.token_budget, self.max_batch_size,
                                     self.chunk_cost):  # fmt: skip
            batch = pad_encodings([encodings[i] for i in chunk], self.pad_id,
                                  left=self.template is not None)  # fmt: skip
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
            if self.template is None:
                scores = self.model(**batch).logits.view(-1).float().cpu().numpy()
            else:  # left-padded prompts: the last position is every row's last token
                last = self.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
                scores = (last[:, self.yes_id] - last[:, self.no_id]).cpu().numpy()
        mask = batch["attention_mask"]
        self.stats.forward_passes += 1
        self.stats.pairs += len(scores)
        self.stats.tokens += int(mask.sum())
        self.stats.padded_tokens += mask.numel()
        self.stats.forward_s += time.perf_counter() - started
        return scores


def tokenize_for(
    tokenizer: Any,
    template: PromptTemplate | None,
    queries: Sequence[str],
    passages: Sequence[str],
    max_len: int,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
) -> list[Encoding]:
    """Encodings of pairs: a cross-encoder's (query, passage) pair, or a decoder's prompt."""
    if template is None:
        return tokenize_pairs(tokenizer, queries, passages, max_len, query_max_len,
                              passage_max_len)  # fmt: skip
    return tokenize_prompts(tokenizer, template, list(queries), list(passages), max_len,
                            query_max_len, passage_max_len)  # fmt: skip


def decoder_template(
    path: str,
    trust_remote_code: bool = False,
    model_kind: str = "auto",
    template: str | None = None,
    instruction: str | None = None,
    yes_token: str | None = None,
    no_token: str | None = None,
) -> PromptTemplate | None:
    """The prompt template when the checkpoint at `path` is (or is told to be) a decoder."""
    from transformers import AutoConfig

    from raykit.model import model_config_path

    config_path = model_config_path(path)  # an adapter's prompt is its base's
    config = AutoConfig.from_pretrained(config_path, trust_remote_code=trust_remote_code)
    return resolve_template(config, model_kind, template, instruction, yes_token, no_token)


def sigmoid(x: float) -> float:
    """Numerically stable logistic function of one logit."""
    import math

    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def sigmoid_array(logits: np.ndarray) -> np.ndarray:
    """The logistic function of many logits, in float64 and without overflow warnings."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


class Reranker:
    """Score (query, passage) pairs with a reranker checkpoint: a cross-encoder, or a decoder
    (Qwen3-Reranker style; `model_kind`, `template`, `instruction`, `yes_token`, `no_token`).

    >>> reranker = Reranker("out/")
    >>> reranker.compute_score(["what is ray?", "Ray is a distributed compute engine."])
    >>> reranker.rerank("what is ray?", ["a fruit", "a compute engine"], top_n=1)

    `dtype` is auto|float32|bfloat16|float16|int8; `fp16`/`bf16` are FlagReranker-style aliases.
    """

    def __init__(
        self,
        model_name_or_path: str,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        fp16: bool = False,
        bf16: bool = False,
        max_length: int = 512,
        batch_size: int = 64,
        token_budget: int = 4096,
        trust_remote_code: bool = False,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        threads: int | None = None,
        model_kind: str = "auto",
        template: str | None = None,
        instruction: str | None = None,
        yes_token: str | None = None,
        no_token: str | None = None,
    ):
        if fp16 and bf16:
            raise ValueError("fp16/bf16: choose one")
        dtype = "float16" if fp16 else "bfloat16" if bf16 else dtype
        self.engine = InferenceEngine.load(
            model_name_or_path, device=device, dtype=dtype, threads=threads,
            trust_remote_code=trust_remote_code, model_kind=model_kind, template=template,
            instruction=instruction, yes_token=yes_token, no_token=no_token, max_len=max_length,
            query_max_len=query_max_length, passage_max_len=passage_max_length,
            token_budget=token_budget, max_batch_size=batch_size,
        )  # fmt: skip
        self.model, self.tokenizer, self.device = (
            self.engine.model, self.engine.tokenizer, self.engine.device
        )  # fmt: skip

    def compute_score(
        self, pairs: Sequence[str] | Sequence[Sequence[str]], normalize: bool = False
    ) -> float | list[float]:
        """A float for one `[query, passage]`, a list of floats for a list of pairs."""
        single = len(pairs) == 2 and all(isinstance(x, str) for x in pairs)
        pair_list = [pairs] if single else list(pairs)
        scores = self.engine.score_pairs(pair_list).astype(np.float64)
        values = (sigmoid_array(scores) if normalize else scores).tolist()
        return values[0] if single else values

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[tuple[int, float]]:
        """(index, score) of the documents, best first."""
        scores = self.compute_score([[query, d] for d in documents]) if documents else []
        ranked = sorted(enumerate(scores), key=lambda x: -x[1])
        return ranked[:top_n] if top_n is not None else ranked

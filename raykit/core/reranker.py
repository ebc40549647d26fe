"""`Reranker`: the Python API, FlagReranker-style, over the one inference engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from raykit.core.activation import sigmoid_array
from raykit.core.engine import InferenceEngine
from raykit.core.spec import SpecRequest
from raykit.runtime.logs import logger

if TYPE_CHECKING:
    import torch


class Reranker:
    """Score (query, passage) pairs with a reranker checkpoint: a cross-encoder, or a decoder
    (Qwen3-Reranker style; `model_kind`, `template`, `instruction`, `yes_token`, `no_token`).

    >>> reranker = Reranker("out/")
    >>> reranker.compute_score(["what is ray?", "Ray is a distributed compute engine."])
    >>> reranker.rerank("what is ray?", ["a fruit", "a compute engine"], top_n=1)

    `dtype` is auto|float32|bfloat16|float16|int8; `fp16`/`bf16` are FlagReranker-style aliases.
    A model raykit wrote knows its prompt and token limits (its `raykit_reranker.json`); the
    arguments left None take them from there, given ones override them (logged). A model
    without a trained head is refused unless `allow_untrained_head`; bf16/fp16 on a CPU that
    only emulates it (~40x slower than fp32) unless `allow_slow_precision`.
    """

    def __init__(
        self,
        model_name_or_path: str,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        fp16: bool = False,
        bf16: bool = False,
        max_length: int | None = None,
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
        allow_untrained_head: bool = False,
        allow_slow_precision: bool = False,
    ):
        if fp16 and bf16:
            raise ValueError("fp16/bf16: choose one")
        dtype = "float16" if fp16 else "bfloat16" if bf16 else dtype
        self.engine = InferenceEngine.load(
            model_name_or_path,
            device=device,
            dtype=dtype,
            threads=threads,
            request=SpecRequest(
                model_kind=model_kind,
                template=template,
                instruction=instruction,
                yes_token=yes_token,
                no_token=no_token,
                max_len=max_length,
                query_max_len=query_max_length,
                passage_max_len=passage_max_length,
                trust_remote_code=trust_remote_code,
            ),
            allow_untrained_head=allow_untrained_head,
            allow_slow_precision=allow_slow_precision,
            announce=logger.info,
            token_budget=token_budget,
            max_batch_size=batch_size,
        )
        self.model, self.tokenizer, self.device = (
            self.engine.model,
            self.engine.tokenizer,
            self.engine.device,
        )

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

"""Tokenising a cross-encoder's (query, passage) pairs under the query/passage/pair limits.

Imports no torch, so Ray Data's tokenising tasks stay light; a decoder's prompts are built in
`raykit.core.prompts` on top of `cut_to_tokens`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Encoding = dict[str, list[int]]  # input_ids (+ token_type_ids) of one pair


def cut_to_tokens(tokenizer: Any, texts: Sequence[str], limit: int) -> list[str]:
    """Cut each text after its first `limit` tokens (using the fast tokenizer's offsets)."""
    offsets = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=True,
        max_length=limit,
        return_offsets_mapping=True,
    )["offset_mapping"]
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
    cut = dict(zip(unique, cut_to_tokens(tokenizer, unique, query_max_len), strict=True))
    queries = [cut[q] for q in queries]
    if passage_max_len and passage_max_len < max_len:
        passages = cut_to_tokens(tokenizer, passages, passage_max_len)
    batch = tokenizer(list(queries), list(passages), truncation="only_second", max_length=max_len)
    keys = [k for k in ("input_ids", "token_type_ids") if k in batch]
    return [{k: batch[k][i] for k in keys} for i in range(len(queries))]

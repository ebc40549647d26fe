"""Decoder (LLM) rerankers' prompts: templates, instructions and yes/no tokens, and the one
tokenisation per model kind (`tokenize_for`) that every check and every forward uses.

A decoder reranker scores a pair as logit(yes) - logit(no) at the last prompt token."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from raykit.core.tokenize import Encoding, tokenize_pairs
from raykit.errors import ConfigError

QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class PromptTemplate:
    """`prefix + pair.format(instruction, query, document) + suffix`; the score is read at
    the last token from the logits of `yes_token` and `no_token`."""

    name: str
    prefix: str
    pair: str
    suffix: str
    instruction: str = ""
    yes_token: str = "yes"
    no_token: str = "no"
    add_bos: bool = False  # put the tokenizer's BOS first (Gemma's prompts start with it)


TEMPLATES = {
    # Qwen3-Reranker's model card (system/user/assistant chat with an empty think block).
    "qwen3": PromptTemplate(
        name="qwen3",
        prefix=(
            "<|im_start|>system\nJudge whether the Document meets the requirements based on "
            'the Query and the Instruct provided. Note that the answer can only be "yes" or '
            '"no".<|im_end|>\n<|im_start|>user\n'
        ),
        pair="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
        suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        instruction=QWEN3_INSTRUCTION,
    ),
    # bge-reranker-v2-gemma (FlagEmbedding's LLM reranker prompt).
    "gemma": PromptTemplate(
        name="gemma",
        prefix="",
        pair="A: {query}\nB: {document}",
        suffix=(
            "\nGiven a query A and a passage B, determine whether the passage contains an "
            "answer to the query by providing a prediction of either 'Yes' or 'No'."
        ),
        yes_token="Yes",
        no_token="No",
        add_bos=True,
    ),
}
# model_type of a causal LM -> its default template.
DEFAULT_TEMPLATE = {
    "qwen2": "qwen3",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
}


def model_kind(config: Any, requested: str = "auto") -> str:
    """`encoder` (one-logit sequence classifier) or `decoder` (a causal LM scored from yes/no
    logits), from the checkpoint's `architectures` unless `requested` says."""
    if requested in ("encoder", "decoder"):
        return requested
    if requested != "auto":
        raise ConfigError(f"model_kind: expected auto, encoder or decoder, got {requested!r}")
    architectures = getattr(config, "architectures", None) or []
    return "decoder" if any(a.endswith("ForCausalLM") for a in architectures) else "encoder"


def load_template(spec: str) -> PromptTemplate:
    """A built-in template by name (`qwen3`, `gemma`) or a JSON/YAML file with the fields of
    `PromptTemplate` (`prefix`, `pair`, `suffix`; optional `instruction`, `yes_token`, ...)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if not os.path.isfile(spec):
        raise ConfigError(f"template: {spec!r} is neither {' nor '.join(TEMPLATES)} nor a file")
    with open(spec) as f:
        text = f.read()
    if spec.endswith(".json"):
        fields = json.loads(text)
    else:
        import yaml

        fields = yaml.safe_load(text)
    missing = [k for k in ("prefix", "pair", "suffix") if k not in (fields or {})]
    if missing:
        raise ConfigError(f"template: {spec}: missing {', '.join(missing)}")
    unknown = set(fields) - set(PromptTemplate.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"template: {spec}: unknown field(s) {', '.join(sorted(unknown))}")
    if "{document}" not in fields["pair"]:
        raise ConfigError(f"template: {spec}: pair must contain {{document}}")
    return PromptTemplate(**{"name": os.path.basename(spec), **fields})


def resolve_template(
    config: Any,
    kind: str = "auto",
    template: str | None = None,
    instruction: str | None = None,
    yes_token: str | None = None,
    no_token: str | None = None,
) -> PromptTemplate | None:
    """The prompt template of a decoder checkpoint (None for an encoder): `template` if given,
    else the default for its model type, with the instruction and yes/no tokens overridden."""
    if model_kind(config, kind) == "encoder":
        return None
    model_type = getattr(config, "model_type", "")
    name = template or DEFAULT_TEMPLATE.get(model_type)
    if name is None:
        raise ConfigError(
            f"template: no default prompt for model type {model_type!r}; "
            f"pass --template {' or '.join(TEMPLATES)} or a template file"
        )
    chosen = load_template(name)
    overrides = {"instruction": instruction, "yes_token": yes_token, "no_token": no_token}
    return replace(chosen, **{k: v for k, v in overrides.items() if v is not None})


def token_id(tokenizer: Any, token: str, field: str) -> int:
    """The id of a token that must be a single token of the vocabulary."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"{field}: {token!r} is {len(ids)} tokens in this tokenizer, not one")
    return ids[0]


def tokenize_prompts(
    tokenizer: Any,
    template: PromptTemplate,
    queries: list[str],
    passages: list[str],
    max_len: int,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
) -> list[dict[str, list[int]]]:
    """Prompt token ids of (query, passage) pairs, unpadded. The query is first cut to
    `query_max_len` tokens and the passage to `passage_max_len`; then the formatted pair is cut
    from its end so that prefix + pair + suffix fit `max_len`."""
    from raykit.core.tokenize import cut_to_tokens as cut_to_tokens

    prefix = tokenizer.encode(template.prefix, add_special_tokens=False)
    if template.add_bos and tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id, *prefix]
    suffix = tokenizer.encode(template.suffix, add_special_tokens=False)
    room = max_len - len(prefix) - len(suffix)
    if room < 8:
        raise ConfigError(f"max_len: {max_len} leaves {room} tokens for the pair after the prompt")
    unique = list(dict.fromkeys(queries))
    cut = dict(
        zip(unique, cut_to_tokens(tokenizer, unique, query_max_len or room // 2), strict=True)
    )
    if passage_max_len:
        passages = cut_to_tokens(tokenizer, passages, passage_max_len)
    texts = [
        template.pair.format(instruction=template.instruction, query=cut[q], document=p)
        for q, p in zip(queries, passages, strict=True)
    ]
    pairs = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)
    return [{"input_ids": prefix + ids + suffix} for ids in pairs["input_ids"]]


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
        return tokenize_pairs(tokenizer, queries, passages, max_len, query_max_len, passage_max_len)
    return tokenize_prompts(
        tokenizer, template, list(queries), list(passages), max_len, query_max_len, passage_max_len
    )

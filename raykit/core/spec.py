"""The reranker spec: how a model scores, saved next to every model raykit writes and read by
every path that loads one, so that a model never has to be told again how it was trained.

`raykit_reranker.json` holds the model kind, the decoder prompt (template inline, instruction,
yes/no tokens and their ids), the token limits and the activation of normalised scores. An
explicit option overrides a saved value and says so in one line; a model raykit did not write
has no spec and keeps the detection of `raykit.core.prompts` and the default limits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from raykit.core.prompts import PromptTemplate, load_template, model_kind, token_id
from raykit.errors import ConfigError

SPEC_FILE = "raykit_reranker.json"
SPEC_VERSION = 1
DEFAULT_MAX_LEN = 512
# Normalised scores are sigmoid(score) (FlagReranker's normalize=True, Cohere's relevance_score).
ACTIVATION = "sigmoid"
LIMITS = ("max_len", "query_max_len", "passage_max_len")
PROMPT_FIELDS = ("instruction", "yes_token", "no_token")


@dataclass(frozen=True)
class SpecRequest:
    """What a command or caller asks for explicitly; None means "the model's, else default"."""

    model_kind: str = "auto"
    template: str | None = None
    instruction: str | None = None
    yes_token: str | None = None
    no_token: str | None = None
    max_len: int | None = None
    query_max_len: int | None = None
    passage_max_len: int | None = None
    trust_remote_code: bool = False

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def of(cls, options: Any) -> SpecRequest:
        """The request held by a config (any object with these attributes)."""
        return cls(**{n: getattr(options, n) for n in cls.fields() if hasattr(options, n)})


@dataclass(frozen=True)
class RerankerSpec:
    """How a model scores: `template` None for a one-logit encoder, else the decoder's prompt."""

    kind: str = "encoder"
    max_len: int = DEFAULT_MAX_LEN
    query_max_len: int | None = None
    passage_max_len: int | None = None
    template: PromptTemplate | None = None
    activation: str = ACTIVATION

    def yes_no_ids(self, tokenizer: Any) -> tuple[int, int] | None:
        """The decoder's (yes, no) token ids in `tokenizer` (None for an encoder)."""
        if self.template is None:
            return None
        return (
            token_id(tokenizer, self.template.yes_token, "yes_token"),
            token_id(tokenizer, self.template.no_token, "no_token"),
        )

    def to_json(self, tokenizer: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"raykit_reranker_spec": SPEC_VERSION, "kind": self.kind}
        data.update({name: getattr(self, name) for name in LIMITS})
        data["activation"] = self.activation
        if self.template is not None:
            data["template"] = asdict(self.template)
            yes, no = self.yes_no_ids(tokenizer) or (None, None)
            data.update(yes_token_id=yes, no_token_id=no)
        return data


def write_spec(folder: str, spec: RerankerSpec, tokenizer: Any) -> None:
    """Save `spec` in `folder`, and the same facts where other tools look for them (see
    `_write_tool_settings`)."""
    with open(os.path.join(folder, SPEC_FILE), "w") as f:
        json.dump(spec.to_json(tokenizer), f, indent=2)
    _write_tool_settings(folder, spec, tokenizer)


def _write_tool_settings(folder: str, spec: RerankerSpec, tokenizer: Any) -> None:
    """What sentence-transformers' CrossEncoder and transformers read: the activation of
    normalised scores (sigmoid) in config.json, `max_len` as the tokenizer's `model_max_length`,
    and for a decoder whose tokens are `yes`/`no` (what CrossEncoder's `LogitScore` reads) the
    prompt as the tokenizer's chat template, so that `CrossEncoder(folder)` builds raykit's."""
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
    tokenizer_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(tokenizer_path):
        return
    with open(tokenizer_path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["model_max_length"] = spec.max_len
    if spec.template is not None and _sentence_transformers_reads_tokens(spec, tokenizer):
        tokenizer_config.pop("chat_template", None)  # the file below is the one template
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(pair_chat_template(spec.template))
    with open(tokenizer_path, "w") as f:
        json.dump(tokenizer_config, f, indent=2)


def _sentence_transformers_reads_tokens(spec: RerankerSpec, tokenizer: Any) -> bool:
    """Whether CrossEncoder's default `LogitScore` (the tokens `yes` and `no`) reads the spec's
    yes/no ids."""
    ids = (tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no"))
    return ids == spec.yes_no_ids(tokenizer)


def pair_chat_template(template: PromptTemplate) -> str:
    """A Jinja chat template that renders sentence-transformers' (query, document) messages
    as the decoder prompt: prefix + pair (the instruction filled in) + suffix."""
    from string import Formatter

    def literal(text: str) -> str:
        return "{{- " + json.dumps(text, ensure_ascii=False) + " -}}" if text else ""

    fields = {"query": "{{- query -}}", "document": "{{- document -}}"}
    parts = [
        "{%- set query = (messages | selectattr('role', 'equalto', 'query') | first).content -%}",
        "{%- set document = (messages | selectattr('role', 'equalto', 'document') | first)"
        ".content -%}",
        "{{- bos_token -}}" if template.add_bos else "",
        literal(template.prefix),
    ]
    for text, field, _, _ in Formatter().parse(template.pair):
        parts.append(literal(text))
        if field == "instruction":
            parts.append(literal(template.instruction))
        elif field is not None:
            parts.append(fields[field])
    parts.append(literal(template.suffix))
    return "".join(parts)


def read_spec(path: str) -> RerankerSpec | None:
    """The spec saved in the local model folder `path`, or None when it has none."""
    file = os.path.join(path, SPEC_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            data = json.load(f)
        template = data.get("template")
        spec = RerankerSpec(
            kind=data["kind"],
            max_len=int(data["max_len"]),
            query_max_len=data.get("query_max_len"),
            passage_max_len=data.get("passage_max_len"),
            template=PromptTemplate(**template) if template else None,
            activation=data.get("activation", ACTIVATION),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{file}: not a valid reranker spec ({type(exc).__name__}: {exc})"
        ) from None
    if spec.kind not in ("encoder", "decoder") or (spec.kind == "decoder") != bool(template):
        raise ConfigError(f"{file}: kind {spec.kind!r} does not match its template")
    if spec.activation != ACTIVATION:
        raise ConfigError(f"{file}: activation {spec.activation!r} (raykit knows {ACTIVATION})")
    return spec


def check_token_ids(path: str, spec: RerankerSpec, tokenizer: Any) -> None:
    """A decoder's yes/no ids must be what its tokenizer says (a swapped tokenizer is refused)."""
    file = os.path.join(path, SPEC_FILE)
    if spec.template is None or not os.path.isfile(file):
        return
    with open(file) as f:
        saved = json.load(f)
    ids = spec.yes_no_ids(tokenizer)
    if saved.get("template") == asdict(spec.template) and ids != (
        saved.get("yes_token_id"),
        saved.get("no_token_id"),
    ):
        raise ConfigError(
            f"{file}: yes/no token ids {saved.get('yes_token_id')}/{saved.get('no_token_id')} "
            f"are {ids[0]}/{ids[1]} in the tokenizer next to it"
        )


def resolve_spec(
    path: str, request: SpecRequest, announce: Callable[[str], None] | None = None
) -> RerankerSpec:
    """The spec to score or train the local model `path` with: the saved one with the explicit
    options of `request` applied (each difference reported through `announce`), or, for a model
    without a saved spec, its detected kind and prompt and the requested or default limits."""
    saved = read_spec(path)
    if saved is None:
        return _detected_spec(path, request)
    spec = _apply_kind_and_template(path, saved, request, announce)
    if spec.template is not None:
        prompt = {n: getattr(request, n) for n in PROMPT_FIELDS if getattr(request, n) is not None}
        _announce_changes(spec.template, prompt, announce)
        spec = replace(spec, template=replace(spec.template, **prompt))
    limits = {n: getattr(request, n) for n in LIMITS if getattr(request, n) is not None}
    _announce_changes(spec, limits, announce)
    return replace(spec, **limits)


def _apply_kind_and_template(
    path: str, saved: RerankerSpec, request: SpecRequest, announce: Callable[[str], None] | None
) -> RerankerSpec:
    kind = saved.kind if request.model_kind == "auto" else request.model_kind
    if kind != saved.kind:
        _say(announce, f"model_kind: {kind} overrides the model's {saved.kind} ({SPEC_FILE})")
        return _detected_spec(path, replace(request, model_kind=kind), saved)
    if request.template is None or saved.template is None:
        return saved
    template = load_template(request.template)
    if template != saved.template:
        _say(announce, f"template: {request.template} overrides the model's ({SPEC_FILE})")
    return replace(saved, template=template)


def _announce_changes(
    current: Any, changes: dict[str, Any], announce: Callable[[str], None] | None
) -> None:
    for name, value in changes.items():
        old = getattr(current, name)
        if value != old:
            _say(announce, f"{name}: {value!r} overrides the model's {old!r} ({SPEC_FILE})")


def _say(announce: Callable[[str], None] | None, message: str) -> None:
    if announce is not None:
        announce(message)


def _detected_spec(
    path: str, request: SpecRequest, base: RerankerSpec | None = None
) -> RerankerSpec:
    """Today's detection: the kind from the checkpoint's architecture, the prompt from its
    model type (or `request.template`), the limits as requested or by default."""
    from transformers import AutoConfig

    from raykit.core.loading import model_config_path
    from raykit.core.prompts import resolve_template

    config = AutoConfig.from_pretrained(
        model_config_path(path), trust_remote_code=request.trust_remote_code
    )
    template = resolve_template(
        config,
        request.model_kind,
        request.template,
        request.instruction,
        request.yes_token,
        request.no_token,
    )
    limits = {n: getattr(request, n) for n in LIMITS if getattr(request, n) is not None}
    start = base or RerankerSpec()
    return replace(
        start,
        kind=model_kind(config, request.model_kind),
        template=template,
        **{"max_len": start.max_len, **limits},
    )


def check_reranker(
    name: str, options: Any, field: str = "model", training: bool = False
) -> RerankerSpec | None:
    """On a driver, before any worker, actor or replica loads the model `name`: it exists,
    it has a trained head (or `options.allow_untrained_head`; fine-tuning creates one and says
    so), and its spec with the options' overrides applied, each override said in one line.
    None for a model on remote storage (its loaders check it)."""
    from raykit.core.loading import check_head, check_model, missing_head, resolve_model_path
    from raykit.runtime.logs import logger
    from raykit.runtime.storage import is_uri

    check_model(name, field)
    if is_uri(name):
        return None
    path = resolve_model_path(name)
    request = SpecRequest.of(options)
    spec = resolve_spec(path, request, logger.info)
    # Fine-tuning creates a missing head (its first worker says so): no need to import the
    # model's class here, seconds of a driver's start.
    if spec.template is None and os.path.isdir(path) and not training:
        missing = missing_head(path, request.trust_remote_code) or []
        check_head(name, missing, getattr(options, "allow_untrained_head", False))
    return spec

"""Model merging (LM-Cocktail): a weighted average of rerankers that share one architecture
(encoders, or decoder rerankers; a LoRA adapter folder is merged into its base first).

Merging a fine-tuned reranker back into its base keeps some of the base's general ability.
Models are loaded one at a time and summed into a running average, so memory holds two models
at most. With `weights: auto` each model's group-softmax loss on a few examples sets the
weights, softmax(-loss / temperature), which LM-Cocktail's own `mix_models_with_data` does not
offer for rerankers.

A base encoder without a classification head (e.g. all-MiniLM-L6-v2) can be mixed too: tensors a
model's checkpoint does not have (the new head) are averaged over the models that have them,
with their weights renormalised, and the command says so.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raykit.config import ConfigError, MixConfig
from raykit.core.loading import local_model_path
from raykit.core.spec import RerankerSpec, SpecRequest, resolve_spec, write_spec
from raykit.data.groups import load_groups
from raykit.runtime.logs import logger
from raykit.runtime.storage import prepare_output_dir, publish_dir
from raykit.tools.model_card import card_name, mix_card, write_card

# Config keys that decide parameter shapes and meaning; they must agree between models.
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_act",
    "position_embedding_type",
    "num_labels",
)


def load_for_mixing(
    name: str, trust_remote_code: bool = False, kind: str = "auto"
) -> tuple[nn.Module, set[str]]:
    """A reranker (one-logit encoder or causal-LM decoder) and the names of the tensors its
    checkpoint did not contain. A LoRA adapter folder is merged into its base first."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from raykit.core.adapters import is_adapter_dir
    from raykit.core.loading import load_model_and_tokenizer, local_model_path, model_config_path
    from raykit.core.prompts import model_kind

    torch.manual_seed(0)  # a missing head is created the same way every time
    try:
        path = local_model_path(name)
        config = AutoConfig.from_pretrained(
            model_config_path(path), trust_remote_code=trust_remote_code
        )
        decoder = model_kind(config, kind) == "decoder"
        if is_adapter_dir(path):
            model, _ = load_model_and_tokenizer(path, trust_remote_code, decoder)
            return model.eval(), set()
        loader = AutoModelForCausalLM if decoder else AutoModelForSequenceClassification
        options = {} if decoder else {"num_labels": 1}
        model, info = loader.from_pretrained(
            path, output_loading_info=True, trust_remote_code=trust_remote_code, **options
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"models: cannot load {name!r}: {str(exc).splitlines()[0]}") from None
    return model.eval(), set(info.get("missing_keys") or [])


def check_same_architecture(first_name: str, first: nn.Module, name: str, other: nn.Module) -> None:
    """ConfigError naming the first differing tensor (name or shape), then config key."""
    mine, theirs = first.state_dict(), other.state_dict()
    for key, tensor in mine.items():
        if key not in theirs:
            raise ConfigError(f"{name}: has no tensor {key!r} (found in {first_name})")
        if theirs[key].shape != tensor.shape:
            raise ConfigError(
                f"{name}: tensor {key!r} has shape {tuple(theirs[key].shape)}, "
                f"{first_name} has {tuple(tensor.shape)}"
            )
    extra = [key for key in theirs if key not in mine]
    if extra:
        raise ConfigError(f"{name}: has tensor {extra[0]!r} that {first_name} does not have")
    for key in ARCHITECTURE_KEYS:  # same shapes can still mean different models
        a, b = getattr(first.config, key, None), getattr(other.config, key, None)
        if a != b:
            raise ConfigError(f"{name}: config {key}={b!r} but {first_name} has {key}={a!r}")


def mix_models(
    names: list[str],
    weights: list[float],
    trust_remote_code: bool = False,
    kind: str = "auto",
    allow_untrained_head: bool = False,
) -> tuple[nn.Module, Any, dict[str, list[str]]]:
    """The weighted average as a model of the first model's class, its tokenizer, and for each
    tensor some checkpoint lacked, the models it was averaged over. A tensor no checkpoint
    has (no model has a trained head) is refused unless `allow_untrained_head`."""
    from transformers import AutoTokenizer

    first, first_missing = load_for_mixing(names[0], trust_remote_code, kind)
    sums: dict[str, torch.Tensor] = {}
    mass: dict[str, float] = {}
    has: dict[str, list[str]] = {}
    for index, (name, weight) in enumerate(zip(names, weights, strict=True)):
        if index == 0:
            model, missing = first, first_missing
        else:
            model, missing = load_for_mixing(name, trust_remote_code, kind)
            check_same_architecture(names[0], first, name, model)
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue  # integer buffers come from the first model
            sums.setdefault(key, torch.zeros_like(tensor, dtype=torch.float32))
            mass.setdefault(key, 0.0)
            has.setdefault(key, [])
            if key in missing:
                continue
            sums[key] += weight * tensor.detach().float()
            mass[key] += weight
            has[key].append(name)
    state = first.state_dict()
    partial = {}
    for key, total in sums.items():
        if len(has[key]) < len(names):
            partial[key] = has[key]
        if mass[key] > 0:
            # Renormalised only where some checkpoint lacked the tensor (its weight is missing).
            value = total if len(has[key]) == len(names) else total / mass[key]
            state[key] = value.to(state[key].dtype)
    first.load_state_dict(state)
    from raykit.core.loading import check_head

    check_head(", ".join(names), [k for k, v in partial.items() if not v], allow_untrained_head)

    tokenizer = AutoTokenizer.from_pretrained(
        local_model_path(names[0]), trust_remote_code=trust_remote_code
    )
    return first, tokenizer, partial


def example_loss(
    model: nn.Module,
    tokenizer: Any,
    groups: list[dict],
    group_size: int,
    token_budget: int = 4096,
    spec: RerankerSpec | None = None,
) -> float:
    """Mean group-softmax loss: each group is its first positive + up to group_size-1 negatives."""
    from raykit.core.engine import InferenceEngine

    pairs, sizes = [], []
    for group in groups:
        passages = [group["pos"][0], *group["neg"][: group_size - 1]]
        pairs += [[group["query"], p] for p in passages]
        sizes.append(len(passages))
    engine = InferenceEngine(
        model,
        tokenizer,
        device=next(model.parameters()).device,
        spec=spec,
        token_budget=token_budget,
    )
    logits = torch.from_numpy(engine.score_pairs(pairs))
    losses, start = [], 0
    for n in sizes:
        group_logits = logits[start : start + n].unsqueeze(0)
        losses.append(F.cross_entropy(group_logits, torch.zeros(1, dtype=torch.long)).item())
        start += n
    return sum(losses) / len(losses)


def auto_weights(cfg: MixConfig) -> tuple[list[float], list[float]]:
    """(weights, losses): weights = softmax(-loss / temperature) over the models."""
    from transformers import AutoTokenizer

    groups = load_groups(cfg.example_data)
    losses = []
    for name in cfg.models:
        model, _ = load_for_mixing(name, cfg.trust_remote_code, cfg.model_kind)
        path = local_model_path(name)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        spec = resolve_spec(path, SpecRequest.of(cfg))
        loss = example_loss(
            model, tokenizer, groups, cfg.train_group_size, cfg.forward_token_budget, spec
        )
        losses.append(loss)
        del model
    weights = torch.softmax(-torch.tensor(losses) / cfg.temperature, dim=0).tolist()
    return weights, losses


def run_mix(cfg: MixConfig) -> dict[str, Any]:
    """Mix `cfg.models` into `cfg.output` (Hugging Face format); returns the summary."""
    cfg.check_paths()
    prepare_output_dir(cfg.output, cfg.overwrite_output_dir, field="output")
    losses = None
    if cfg.auto_weights:
        weights, losses = auto_weights(cfg)
    else:
        weights = cfg.weight_values
    model, tokenizer, partial = mix_models(
        cfg.models, weights, cfg.trust_remote_code, cfg.model_kind, cfg.allow_untrained_head
    )
    # The mix scores as its first model does (its spec, the options applied).
    spec = resolve_spec(local_model_path(cfg.models[0]), SpecRequest.of(cfg), logger.info)
    summary = {
        "models": cfg.models,
        "weights": [round(w, 6) for w in weights],
        "example_losses": losses,
        "averaged_over_some_models": partial,
        "output": cfg.output,
    }

    def write(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_spec(folder, spec, tokenizer)
        with open(os.path.join(folder, "mix.json"), "w") as f:
            json.dump(summary, f, indent=2)
        write_card(folder, mix_card(cfg, summary), card_name(cfg.output))

    publish_dir(cfg.output, write)
    for key, names in partial.items():
        source = (
            f"averaged over {names}" if names else f"new in every model, kept from {cfg.models[0]}"
        )
        logger.info(f"mix: {key}: not in every checkpoint, {source}")
    shown = ", ".join(f"{n}={w:.4f}" for n, w in zip(cfg.models, weights, strict=True))
    if losses:
        shown += " (example losses: " + ", ".join(f"{x:.4f}" for x in losses) + ")"
    logger.info(f"mix weights: {shown}")
    return summary

"""LoRA adapters (peft) for both model kinds: adding them for training, loading a saved adapter
on its base, and merging it into a plain Hugging Face model.

An adapter folder (checkpoints of a `--use_lora` run, and its output with
`--save_merged_model false`) holds peft's `adapter_config.json` and weights plus the tokenizer;
`base_model_name_or_path` in that config names the base it was trained on. Every loader in
raykit (`InferenceEngine.load`, `Reranker`, `mix`) accepts such a folder and merges it.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from raykit.errors import ConfigError

if TYPE_CHECKING:  # annotations only: a driver asking whether a folder is an adapter needs none
    from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
# peft's name for every linear layer except the output layer (lm_head / the classifier).
ALL_LINEAR = "all-linear"


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str) -> str:
    """The base model an adapter folder names (a hub id, local folder, embedded name or URI)."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}/{ADAPTER_CONFIG}: base_model_name_or_path is not set")
    return base


def base_model_name(name_or_path: str) -> str:
    """How an adapter names its base: an absolute path for a local folder, else as given (a hub
    id, an embedded name or a URI), so it still resolves from another working directory."""
    return os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path


def add_lora(
    model: nn.Module,
    *,
    decoder: bool,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    base_name: str,
) -> nn.Module:
    """`model` wrapped with fresh LoRA adapters; only the adapters (and an encoder's classifier
    head, which a new head needs) are trainable. `base_name` is recorded in the adapter config
    so the saved adapter says what it applies to."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets: str | list[str] = target_modules or ALL_LINEAR
    if targets == [ALL_LINEAR]:
        targets = ALL_LINEAR
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM if decoder else TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target module the model does not have
        raise ConfigError(f"lora_target_modules: {str(exc).splitlines()[0]}") from None
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def load_adapter(model: nn.Module, path: str, trainable: bool = False) -> nn.Module:
    """The base `model` with the adapter saved at `path` (trainable to resume a run)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, path, is_trainable=trainable)


def merge(model: nn.Module) -> nn.Module:
    """A peft model's adapters folded into the base weights: a plain transformers model."""
    return model.merge_and_unload()


def is_decoder_adapter(path: str) -> bool:
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        return json.load(f).get("task_type") == "CAUSAL_LM"


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"

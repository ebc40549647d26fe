"""Checkpoints and exports of a fine-tune: what a checkpoint folder holds (model, optimizer and
RNG state for resume) and how the best one becomes a plain Hugging Face model with its card."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import torch
from ray.train import Checkpoint

from raykit.config import FinetuneConfig
from raykit.core.adapters import is_adapter_dir
from raykit.core.export import save_merged
from raykit.core.head import CrossEncoder
from raykit.core.spec import RerankerSpec, write_spec
from raykit.runtime.storage import publish_dir
from raykit.tools.model_card import card_name, write_card

TRAINER_STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "raykit_finetune.json"
SUMMARY_FILE = "train_summary.json"


def _save_checkpoint(
    directory: str,
    encoder: CrossEncoder,
    tokenizer: Any,
    cfg: FinetuneConfig,
    spec: RerankerSpec,
    state: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The model (the adapter alone with LoRA), tokenizer, reranker spec, trainer state and
    config; `model_state` is the full state dict gathered from FSDP shards."""
    extra = {"state_dict": model_state} if model_state is not None else {}
    encoder.hf_model.save_pretrained(directory, safe_serialization=True, **extra)
    tokenizer.save_pretrained(directory)
    write_spec(directory, spec, tokenizer)
    torch.save(state, os.path.join(directory, TRAINER_STATE_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def export_model(
    checkpoint: Checkpoint,
    output_dir: str,
    summary: dict[str, Any],
    card: str | None = None,
    merge_adapter: bool = True,
    trust_remote_code: bool = False,
) -> None:
    """Publish a checkpoint's Hugging Face files (not the optimizer state) as `output_dir`, with
    `train_summary.json` (loss and eval history, throughput) and the model card `card`. The
    folder is replaced as a whole and appears complete or not at all (see `publish_dir`).

    A LoRA checkpoint is exported merged into its base (`merge_adapter`), else as the adapter."""

    def write(folder: str) -> None:
        with checkpoint.as_directory() as ckpt_dir:
            merged = merge_adapter and is_adapter_dir(ckpt_dir)
            if merged:
                save_merged(ckpt_dir, folder, trust_remote_code)
            for name in os.listdir(ckpt_dir):
                src = os.path.join(ckpt_dir, name)
                if name == TRAINER_STATE_FILE or (merged and name.startswith("adapter_")):
                    continue  # (the merged model's tokenizer files are the checkpoint's)
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(folder, name))
                else:
                    shutil.copy2(src, os.path.join(folder, name))
        with open(os.path.join(folder, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        if card:
            write_card(folder, card, card_name(output_dir))

    publish_dir(output_dir, write)

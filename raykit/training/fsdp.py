"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models that do not fit one device.

Each transformer block (the model's `_no_split_modules` classes) becomes its own shard unit and
the Hugging Face model a unit of its own, so a forward of the bare model (the evaluation engine
calls it directly) gathers the embeddings and head as well. Every forward is collective: the
caller runs the same number of forwards on every rank (one chunk per micro-batch, and every
rank scores every evaluation pair). Checkpoints hold full (unsharded) state dicts, written by
rank 0, so a run resumes on any number of workers and the export is a plain model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODEL_PREFIX = "hf_model."


def shard_model(encoder: nn.Module, device: torch.device) -> nn.Module:
    """`encoder` (a `CrossEncoder`) on `device`, its `hf_model` sharded over the process group."""
    from torch.distributed.fsdp import fully_shard

    encoder.to(device)
    hf_model = encoder.hf_model
    # A peft wrapper forwards unknown attributes to the transformers model it wraps.
    block_names = set(getattr(hf_model, "_no_split_modules", None) or [])
    blocks = [m for m in hf_model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"fsdp: found no transformer blocks ({sorted(block_names)}) to shard")
    for block in blocks:
        fully_shard(block)
    fully_shard(hf_model)
    return encoder


def full_model_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of `encoder.hf_model` on CPU (collective; full on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(encoder, options=options)
    return {k.removeprefix(MODEL_PREFIX): v for k, v in state.items()}


def full_optimizer_state(encoder: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's unsharded state, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(encoder, optimizer, options=options)


def load_optimizer_state(
    encoder: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Shard a full optimizer state (from `full_optimizer_state`) back onto this rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(encoder, optimizer, optim_state_dict=state, options=options)

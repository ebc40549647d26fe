"""Writing a LoRA adapter merged into its base as a plain Hugging Face model that keeps the
adapter's reranker spec (how it scores)."""

from __future__ import annotations

import torch

from raykit.core.adapters import is_decoder_adapter
from raykit.core.loading import load_model_and_tokenizer
from raykit.core.spec import read_spec, write_spec


def save_merged(adapter_dir: str, output: str, trust_remote_code: bool = False) -> None:
    """Write the base with the adapter at `adapter_dir` merged in, the tokenizer and the
    adapter's spec (if it has one) to `output` as a plain Hugging Face model, in the base
    checkpoint's own dtype (bf16 for most LLMs)."""
    model, tokenizer = load_model_and_tokenizer(
        adapter_dir, trust_remote_code, decoder=is_decoder_adapter(adapter_dir)
    )
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    spec = read_spec(adapter_dir)
    if spec is not None:
        write_spec(output, spec, tokenizer)

"""Model FLOP utilisation (MFU): the FLOPs a training step needs for the tokens it trained on,
from the model's shape, against the hardware's peak for the precision the matmuls run in.

A GPU's peak is its data-sheet figure (dense, no sparsity) where this table knows the card;
a CPU has no such figure a program can read (clocks and vector units vary by SKU and VM), so
its peak is measured: the best rate of a large GEMM on this worker's threads, cached per node.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raykit.core.precision import cpu_capabilities
from raykit.runtime.storage import node_cache_dir

# Dense peak TFLOP/s of data-center GPUs: (16-bit tensor cores, fp32 without TF32).
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),  # SXM
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10G": (70.0, 31.2),
}
_GEMM_SIZE = {"cpu": 1024, "cuda": 8192}
_MEASURE_S = 0.3


@dataclass(frozen=True)
class PeakFlops:
    flops_per_s: float
    source: str  # "data sheet: <name>" or "measured GEMM"


@dataclass(frozen=True)
class ModelFlops:
    """The shape numbers that decide a training step's FLOPs per token."""

    body_params: int  # what every token passes through (not embeddings, not the output head)
    trainable_body_params: int
    layers: int
    attention_width: int  # heads x head dim

    @classmethod
    def of(cls, model: nn.Module) -> ModelFlops:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        body, trainable = body_parameters(model)
        return cls(body, trainable, config.num_hidden_layers, heads * head_dim)

    def per_token(self, sequence_length: float) -> float:
        """Forward 2N, backward 2N for activations plus 2N for the weights that train (a LoRA
        run skips the frozen ones), and attention 12 x layers x width x length (PaLM's count)."""
        matmuls = 4 * self.body_params + 2 * self.trainable_body_params
        return matmuls + 12 * self.layers * self.attention_width * sequence_length


def body_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) weight matrices every token is multiplied by: not biases and norms
    (elementwise), the embeddings (a lookup), a BERT pooler or the output head (once per
    sequence: a classifier, or a decoder's last-position logits)."""
    skipped = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    skipped += [m for name, m in model.named_modules() if name.endswith("pooler")]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skipped += [head] if head is not None else []
    skip = {id(p) for m in skipped for p in m.parameters()}
    kept = [p for p in model.parameters() if id(p) not in skip and p.dim() >= 2]
    return sum(p.numel() for p in kept), sum(p.numel() for p in kept if p.requires_grad)


def peak_flops(device: torch.device, dtype: torch.dtype) -> PeakFlops:
    """This worker's peak for matmuls in `dtype` (the autocast dtype, or float32)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for card, (half, single) in GPU_PEAK_TFLOPS.items():
            if card in name:
                tflops = single if dtype == torch.float32 else half
                return PeakFlops(tflops * 1e12, f"data sheet: {card}")
    return PeakFlops(_cached_gemm_rate(device, dtype), "measured GEMM")


def _cached_gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """`measure_gemm_rate`, remembered per node for this CPU (or GPU), torch, dtype and thread
    count: the measurement costs a third of a second of every start-up otherwise."""
    what = device_fingerprint(device, dtype)
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(what), float):
        return cached[what]
    rate = measure_gemm_rate(device, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, what: rate}))
        tmp.replace(path)  # atomic: workers of one node may write at once
    except OSError:
        pass  # a read-only home: measure again next time
    return rate


def device_fingerprint(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        caps = cpu_capabilities()
        flags = sorted(k for k, v in caps.items() if v is True)
        hardware = f"{caps.get('cpu_name')} {' '.join(flags)} threads={torch.get_num_threads()}"
    text = f"{hardware} torch={torch.__version__} {dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file() -> Path:
    return Path(node_cache_dir("peak_flops.json"))


def measure_gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """The best FLOP/s of a square GEMM over ~0.3 s, after a warm-up."""
    n = _GEMM_SIZE.get(device.type, 1024)
    # A generator of its own: the training run's RNG streams (dropout) must not depend on
    # whether the peak was measured or read from the cache.
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    best, deadline = 0.0, time.perf_counter() + _MEASURE_S
    for i in range(1000):
        started = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if i > 0:  # the first is the warm-up
            best = max(best, 2 * n**3 / elapsed)
        if time.perf_counter() > deadline and i >= 3:
            break
    return best

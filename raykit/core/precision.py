"""Precision names and what they do to a model: `auto` resolved per device, low precisions the
CPU only emulates refused, bf16/fp16 casts that keep the classification head in fp32, and
torchao's dynamic int8."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from raykit.errors import ConfigError
from raykit.runtime.logs import logger

if TYPE_CHECKING:
    import torch


DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")

# The x86 flags that make a low precision fast on CPU; without one, oneDNN emulates it and a
# bf16 matmul runs at ~1/40 of fp32 (1.2 against 50 GFLOP/s on an AVX2-only EPYC).
NATIVE_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


@functools.cache
def cpu_capabilities() -> dict[str, Any]:
    """torch's view of this CPU (`cpu_name`, `architecture`, instruction-set flags)."""
    import torch

    try:
        return dict(torch.cpu.get_capabilities())
    except Exception:  # an old or unusual build: nothing known, nothing refused
        return {}


def cpu_has_native(precision: str) -> bool | None:
    """Whether this CPU computes `precision` natively; None when torch cannot tell (not x86)."""
    if precision not in NATIVE_CPU_FLAGS:
        return True  # without asking torch: a driver's fp32 check needs no torch import
    caps = cpu_capabilities()
    if caps.get("architecture") not in ("x86_64", "x86", "AMD64"):
        return None
    return any(caps.get(flag) for flag in NATIVE_CPU_FLAGS[precision])


def cpu_description() -> str:
    """The CPU's name and the flags that decide low-precision speed, for messages."""
    caps = cpu_capabilities()
    flags = [f for f in ("avx2", "avx512_f", *sum(NATIVE_CPU_FLAGS.values(), ())) if caps.get(f)]
    return f"{caps.get('cpu_name') or 'unknown CPU'} ({' '.join(flags) or 'no AVX2/AVX-512'})"


def check_cpu_precision(precision: str, allow_slow: bool = False) -> None:
    """Refuse a precision this CPU only emulates (a one-line `ConfigError` naming both), or with
    `allow_slow` warn and let it run."""
    if cpu_has_native(precision) is not False:
        return
    flags = " or ".join(NATIVE_CPU_FLAGS[precision])
    message = (
        f"dtype {precision}: this CPU, {cpu_description()}, has no {flags}, so {precision} runs "
        "~40x slower than float32 here"
    )
    if allow_slow:
        logger.warning(f"{message} (running it: --allow_slow_precision)")
        return
    raise ConfigError(
        f"{message}; use --dtype float32 (what auto picks on CPU), or --allow_slow_precision "
        "to run it anyway"
    )


def resolve_dtype(requested: str, device_type: str, allow_slow: bool = False) -> str:
    """The precision a model will run at: `auto` becomes fp32 on CPU (exact), bf16 (or fp16 where
    the GPU lacks bf16) on GPU. A low precision the CPU only emulates is refused unless
    `allow_slow` (see `check_cpu_precision`)."""
    import torch

    if requested not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {requested!r}")
    if requested == "auto":
        if device_type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu":
        check_cpu_precision(requested, allow_slow)
    return requested


def describe_precision(requested: str, device_type: str) -> str:
    """The precision a command runs at and why, for its start-up line: what `auto` chose, and on
    a CPU with native bf16 that `--dtype bfloat16` would be faster (scores not exact)."""
    if requested != "auto":
        return f"dtype {requested}"
    if device_type == "cuda":
        return "dtype auto (bfloat16 on GPUs that have it, else float16)"
    if cpu_has_native("bfloat16"):
        return (
            "dtype auto: float32 (exact; this CPU has native bf16: --dtype bfloat16 runs faster, "
            "scores not bit-equal)"
        )
    return "dtype auto: float32 (this CPU has no native bf16)"


def torch_dtype(name: str) -> torch.dtype | None:
    """The floating dtype of a precision name; None for float32 and int8 (fp32 activations)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


HEAD_NAMES = ("classifier", "score")  # encoders' and decoders' sequence-classification heads


def _inputs_to_float32(module: Any, args: tuple) -> tuple:
    return tuple(a.float() if getattr(a, "is_floating_point", lambda: False)() else a for a in args)


def keep_head_float32(model: Any) -> None:
    """Run the classification head of a bf16/fp16 model in float32.

    A logit rounded to bf16 keeps 8 significant bits, so most candidates of a query tie: 362
    distinct scores for 2,090 CQA dev pairs, NDCG@10 -0.0034 against fp32. With the head in
    fp32: 2,074 distinct scores, NDCG@10 +0.0005, at no measurable cost (one small layer)."""
    import torch

    head = next(
        (
            getattr(model, name)
            for name in HEAD_NAMES
            if isinstance(getattr(model, name, None), torch.nn.Module)
        ),
        None,
    )
    if head is not None:
        head.float()
        head.register_forward_pre_hook(_inputs_to_float32)


def quantize_int8(model: Any) -> Any:
    """torchao's dynamic int8 quantisation of every linear layer (weights and activations)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise ImportError("dtype int8 needs torchao: pip install 'raykit[int8]'") from None
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model

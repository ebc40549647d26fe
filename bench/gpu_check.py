"""GPU path check, run on a lent GPU machine (never in CI): AMP fp16/bf16 training steps,
fp16 inference against fp32, decoder (LLM) reranker inference, `raykit finetune --use_gpu`
(NCCL, one GPU worker) and LoRA bf16 fine-tuning of a Qwen3-Reranker-0.6B-shaped model with
DDP and FSDP (steps/s, tokens/s, peak memory).

Run: python bench/gpu_check.py [--skip_ray]   (prints one JSON line per check)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raykit.core.batching import make_chunks
from raykit.core.head import CrossEncoder
from raykit.core.loading import load_model_and_tokenizer
from raykit.core.losses import group_softmax_loss
from raykit.core.reranker import Reranker
from raykit.core.tokenize import tokenize_pairs
from raykit.data.groups import load_groups, sample_group
from tests.helpers import build_tiny_reranker  # noqa: E402


def emit(check: str, **figures) -> None:
    print(json.dumps({"check": check, **figures}), flush=True)


def amp_training(model_dir: str, fp16: bool, bf16: bool) -> None:
    device = torch.device("cuda")
    model, tokenizer = load_model_and_tokenizer(model_dir)
    encoder = CrossEncoder(model).to(device).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    groups_data = load_groups(str(ROOT / "examples/data/train.jsonl"))[:8]
    rng = np.random.default_rng(0)
    groups = [sample_group(r, 4, rng) for r in groups_data]
    encodings = tokenize_pairs(
        tokenizer,
        [g.query for g in groups for _ in g.passages],
        [p for g in groups for p in g.passages],
        128,
    )
    losses, logits_dtype = [], None
    for _ in range(30):
        chunks, order, _ = make_chunks(encodings, 512, tokenizer.pad_token_id, device)
        dtype = torch.float16 if fp16 else torch.bfloat16
        with torch.autocast("cuda", dtype, enabled=fp16 or bf16):
            logits = encoder(chunks, order)
        logits_dtype = str(logits.dtype)
        loss = group_softmax_loss(logits, 4)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    ok = all(np.isfinite(losses)) and losses[-1] < losses[0]
    emit(
        "amp_training",
        fp16=fp16,
        bf16=bf16,
        logits_dtype=logits_dtype,
        first_loss=round(losses[0], 4),
        last_loss=round(losses[-1], 4),
        ok=ok,
    )


def inference(model_dir: str) -> None:
    pairs = [
        [g["query"], p]
        for g in load_groups(str(ROOT / "examples/data/dev.jsonl"))
        for p in g["pos"] + g["neg"]
    ]
    cpu = Reranker(model_dir, device="cpu").compute_score(pairs)
    fp32 = Reranker(model_dir, device="cuda", dtype="float32").compute_score(pairs)
    fp16 = Reranker(model_dir, device="cuda", fp16=True).compute_score(pairs)
    bf16 = Reranker(model_dir, device="cuda", bf16=True).compute_score(pairs)
    emit(
        "inference",
        pairs=len(pairs),
        max_diff_cuda_fp32_vs_cpu=float(np.max(np.abs(np.array(fp32) - cpu))),
        max_diff_fp16_vs_fp32=float(np.max(np.abs(np.array(fp16) - fp32))),
        max_diff_bf16_vs_fp32=float(np.max(np.abs(np.array(bf16) - fp32))),
    )


H100_H200_BF16_DENSE_TFLOPS = 989.0  # SXM datasheet, dense (no sparsity)


def base_sized_throughput(tmp: str) -> None:
    """The inference engine on a random BERT-base-sized cross-encoder (110M parameters) at
    fp32 / fp16 / bf16: pairs/s, tokens/s, padding and the fraction of the GPU's bf16 peak."""
    from raykit.core.engine import InferenceEngine

    model_dir = build_tiny_reranker(f"{tmp}/base", hidden_size=768, layers=12)
    rng = np.random.default_rng(0)
    words = ["passage", "text", "about", "eggs", "rays", "and", "the", "sky"]
    pairs = [
        [
            "how long should I boil an egg for a soft yolk",
            " ".join(rng.choice(words, int(rng.integers(20, 200)))),
        ]
        for _ in range(8192)
    ]
    for dtype in ("float32", "float16", "bfloat16"):
        engine = InferenceEngine.load(
            model_dir,
            device="cuda",
            dtype=dtype,
            max_len=256,
            token_budget=65536,
            max_batch_size=512,
        )
        encodings = engine.tokenize([q for q, _ in pairs], [p for _, p in pairs])
        engine.score_encodings(encodings[:1024])
        torch.cuda.synchronize()
        engine.stats = type(engine.stats)()
        started = time.perf_counter()
        engine.score_encodings(encodings)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
        tokens = engine.stats.tokens
        flops = 2 * 85e6 * engine.stats.padded_tokens  # 2 x encoder weights per padded token
        emit(
            "engine_base_sized",
            dtype=dtype,
            pairs_per_s=round(len(pairs) / wall, 1),
            tokens_per_s=round(tokens / wall),
            padding_ratio=round(engine.stats.padding_ratio, 3),
            forward_passes=engine.stats.forward_passes,
            fraction_of_bf16_peak=round(flops / wall / (H100_H200_BF16_DENSE_TFLOPS * 1e12), 3),
        )


def llm_reranker_inference(tmp: str, device: str = "cuda") -> None:
    """Decoder rerankers: a tiny Qwen3 scores on the GPU (fp32 and bf16) as on the CPU; then
    a random model of Qwen3-Reranker-0.6B's shape (hidden 1024, 28 layers, 16 heads) at bf16:
    pairs/s, tokens/s and the fraction of the GPU's bf16 peak."""
    from raykit.core.engine import InferenceEngine
    from tests.helpers import build_tiny_decoder

    tiny = build_tiny_decoder(f"{tmp}/qwen3-tiny", "qwen3")
    pairs = [
        [g["query"], p]
        for g in load_groups(str(ROOT / "examples/data/dev.jsonl"))
        for p in g["pos"] + g["neg"]
    ]
    cpu = np.array(Reranker(tiny, device="cpu").compute_score(pairs))
    fp32 = np.array(Reranker(tiny, device=device, dtype="float32").compute_score(pairs))
    bf16 = np.array(Reranker(tiny, device=device, bf16=True).compute_score(pairs))
    emit(
        "llm_reranker_tiny",
        pairs=len(pairs),
        max_diff_fp32_vs_cpu=float(np.abs(fp32 - cpu).max()),
        max_diff_bf16_vs_fp32=float(np.abs(bf16 - fp32).max()),
        same_best_pair_bf16=bool(np.argmax(bf16) == np.argmax(fp32)),
    )

    model_dir = build_tiny_decoder(
        f"{tmp}/qwen3-0.6b-shape", "qwen3", hidden_size=1024, layers=28, heads=16
    )
    engine = InferenceEngine.load(
        model_dir,
        device=device,
        dtype="bfloat16",
        max_len=512,
        token_budget=65536,
        max_batch_size=256,
    )
    params = sum(p.numel() for n, p in engine.model.named_parameters() if "embed" not in n)
    rng = np.random.default_rng(0)
    words = ["passage", "text", "about", "eggs", "rays", "and", "the", "sky"]
    docs = [" ".join(rng.choice(words, int(rng.integers(20, 200)))) for _ in range(4096)]
    encodings = engine.tokenize(["how long should I boil an egg"] * len(docs), docs)
    engine.score_encodings(encodings[:256])
    if device == "cuda":
        torch.cuda.synchronize()
    engine.stats = type(engine.stats)()
    started = time.perf_counter()
    engine.score_encodings(encodings)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    flops = 2 * params * engine.stats.padded_tokens
    emit(
        "llm_reranker_0.6b_shape_bf16",
        params_non_embedding=params,
        pairs_per_s=round(len(docs) / wall, 1),
        tokens_per_s=round(engine.stats.tokens / wall),
        padding_ratio=round(engine.stats.padding_ratio, 3),
        fraction_of_bf16_peak=round(flops / wall / (H100_H200_BF16_DENSE_TFLOPS * 1e12), 3),
    )


def ray_finetune(model_dir: str, tmp: str, precision: str) -> None:
    out = f"{tmp}/out-{precision}"
    cmd = [
        sys.executable,
        "-m",
        "raykit.cli",
        "finetune",
        "--model_name_or_path",
        model_dir,
        "--train_data",
        str(ROOT / "examples/data/train.jsonl"),
        "--eval_data",
        str(ROOT / "examples/data/dev.jsonl"),
        "--output_dir",
        out,
        "--storage_path",
        f"{tmp}/ray",
        "--use_gpu",
        f"--{precision}",
        "--num_workers",
        "1",
        "--max_steps",
        "20",
        "--learning_rate",
        "1e-3",
        "--train_group_size",
        "4",
        "--max_len",
        "128",
        "--logging_steps",
        "5",
        "--eval_steps",
        "10",
    ]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    log = proc.stdout + proc.stderr
    lines = [line for line in log.splitlines() if "[raykit]" in line or "dev " in line]
    summary_path = Path(out) / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    emit(
        "ray_finetune_use_gpu",
        precision=precision,
        returncode=proc.returncode,
        seconds=round(time.time() - started, 1),
        nccl="nccl" in log.lower(),
        steps=summary.get("steps"),
        final_eval=(summary.get("eval") or [None])[-1],
        log=lines[-8:] if proc.returncode == 0 else log[-3000:],
    )
    if proc.returncode == 0:
        scores = Reranker(out, device="cuda", fp16=True).compute_score([["q", "p"], ["a", "b"]])
        emit("load_exported_on_gpu", precision=precision, scores=scores)


def llm_lora_finetune(
    tmp: str, fsdp: bool, use_gpu: bool = True, shape: tuple[int, int, int] = (1024, 28, 16)
) -> None:
    """`raykit finetune --use_gpu --bf16 --use_lora` (and `--fsdp`) of a random model of
    Qwen3-Reranker-0.6B's shape (hidden, layers, heads) on synthetic groups (one GPU worker):
    steps/s, pairs/s, tokens/s, peak GPU memory, and whether the merged export loads and
    scores. `use_gpu=False` and a small `shape` try the same command on a CPU."""
    from tests.helpers import build_tiny_decoder

    hidden, layers, heads = shape
    model_dir = f"{tmp}/qwen3-{hidden}x{layers}"
    if not Path(model_dir).exists():
        build_tiny_decoder(model_dir, "qwen3", hidden_size=hidden, layers=layers, heads=heads)
    rng = np.random.default_rng(0)
    words = ["passage", "text", "about", "eggs", "rays", "and", "the", "sky", "yes", "no"]
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    data = Path(tmp) / "llm-train.jsonl"
    groups = [
        {
            "query": text(8),
            "pos": [text(120)],
            "neg": [text(int(rng.integers(40, 200))) for _ in range(7)],
        }
        for _ in range(256)
    ]
    data.write_text("".join(json.dumps(g) + "\n" for g in groups))
    out = f"{tmp}/llm-out-{'fsdp' if fsdp else 'ddp'}"
    cmd = [
        sys.executable,
        "-m",
        "raykit.cli",
        "finetune",
        "--model_name_or_path",
        model_dir,
        "--train_data",
        str(data),
        "--output_dir",
        out,
        "--storage_path",
        f"{tmp}/ray",
        *(["--use_gpu"] if use_gpu else []),
        "--bf16",
        "--use_lora",
        "--lora_rank",
        "32",
        "--lora_alpha",
        "64",
        "--gradient_checkpointing",
        "--num_workers",
        "1",
        "--max_steps",
        "30",
        "--per_device_train_batch_size",
        "8",
        "--train_group_size",
        "8",
        "--max_len",
        "512",
        "--learning_rate",
        "1e-4",
        "--logging_steps",
        "10",
        *(["--fsdp"] if fsdp else []),
    ]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=500)
    summary_path = Path(out) / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    last = (summary.get("loss") or [{}])[-1]
    steps_per_s = summary["steps"] / summary["train_seconds"] if summary else None
    emit(
        "llm_lora_bf16_finetune",
        fsdp=fsdp,
        returncode=proc.returncode,
        seconds=round(time.time() - started, 1),
        steps=summary.get("steps"),
        steps_per_s=steps_per_s and round(steps_per_s, 2),
        pairs_per_s=last.get("pairs_per_s"),
        tokens_per_s=last.get("tokens_per_s"),
        peak_gpu_memory_gb=summary.get("peak_gpu_memory_gb"),
        losses=[round(e["loss"], 4) for e in summary.get("loss", [])],
        log=None if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:],
    )
    if proc.returncode == 0:
        device = "cuda" if use_gpu else "cpu"
        scores = Reranker(out, device=device, bf16=True).compute_score([["q", "p"], ["a", "b"]])
        emit("llm_merged_export_loads", fsdp=fsdp, device=device, scores=scores)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip_ray", action="store_true")
    args = parser.parse_args()
    emit("device", name=torch.cuda.get_device_name(0), torch=torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_reranker(f"{tmp}/tiny", hidden_size=64, layers=2)
        amp_training(model_dir, fp16=True, bf16=False)
        amp_training(model_dir, fp16=False, bf16=True)
        inference(model_dir)
        base_sized_throughput(tmp)
        llm_reranker_inference(tmp)
        if not args.skip_ray:
            for precision in ("fp16", "bf16"):
                ray_finetune(model_dir, tmp, precision)
            for fsdp in (False, True):
                llm_lora_finetune(tmp, fsdp)


if __name__ == "__main__":
    main()

"""Benchmark: one training worker's steps, eager against inductor-compiled (`--torch_compile`),
and the AdamW update, foreach against fused, on all-MiniLM-L6-v2 and CQA groups.

The same steps run in one process: the recipe's own pieces (group sampling, tokenising,
length-sorted chunks under the forward token budget, `CrossEncoder`, group softmax loss).
Prints the CPU, the compile time, steps/s and pairs/s after compiling, the loss difference
step by step (exactness bar: 1e-4), the steps a run needs before compiling pays for itself,
and the optimizer step's milliseconds. Writes bench/results/train_compile.json.

Run: python bench/train_compile.py [--data ../shared/data/cqa] [--steps 40] [--threads 1]
The CQA data is research-only: it is read from ../shared, never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykit.core.batching import make_chunks
from raykit.core.head import CrossEncoder
from raykit.core.loading import load_model_and_tokenizer, resolve_model_path
from raykit.core.losses import group_softmax_loss
from raykit.core.precision import cpu_description
from raykit.core.tokenize import tokenize_pairs
from raykit.data.groups import load_groups, sample_group
from raykit.training.recipe import compile_for_training

GROUP_SIZE, BATCH_GROUPS, MAX_LEN, TOKEN_BUDGET = 8, 4, 256, 4096


def batches(train_file: str, steps: int, tokenizer) -> list[list[dict]]:
    """The encodings of each step's groups, fixed up front so both runs see the same data."""
    records = load_groups(train_file)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))
    steps_encodings = []
    for step in range(steps):
        chosen = [records[i] for i in order[step * BATCH_GROUPS : (step + 1) * BATCH_GROUPS]]
        groups = [sample_group(r, GROUP_SIZE, rng) for r in chosen]
        queries = [g.query for g in groups for _ in g.passages]
        passages = [p for g in groups for p in g.passages]
        steps_encodings.append(tokenize_pairs(tokenizer, queries, passages, MAX_LEN))
    return steps_encodings


def run(steps_encodings: list, compiled: bool, fused: bool) -> dict:
    torch.manual_seed(0)
    hf_model, tokenizer = load_model_and_tokenizer(
        resolve_model_path("minilm-l6"), allow_untrained_head=True
    )
    hf_model.config.hidden_dropout_prob = 0.0  # equal losses need equal (no) dropout masks
    hf_model.config.attention_probs_dropout_prob = 0.0
    for module in hf_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = CrossEncoder(hf_model)
    if compiled:
        compile_for_training(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=fused)
    losses, seconds, optimizer_ms = [], [], []
    for encodings in steps_encodings:
        started = time.perf_counter()
        chunks, order, _ = make_chunks(
            encodings, TOKEN_BUDGET, tokenizer.pad_token_id, torch.device("cpu")
        )
        loss = group_softmax_loss(model(chunks, order), GROUP_SIZE)
        loss.backward()
        before_update = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        optimizer_ms.append((time.perf_counter() - before_update) * 1000)
        seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
    return {"losses": losses, "seconds": seconds, "optimizer_ms": optimizer_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/cqa")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, tokenizer = load_model_and_tokenizer(
        resolve_model_path("minilm-l6"), allow_untrained_head=True
    )
    steps_encodings = batches(str(Path(args.data) / "train.jsonl"), args.steps, tokenizer)
    print(f"CPU: {cpu_description()}, {args.threads} torch thread(s), torch {torch.__version__}")
    results = {
        "eager, foreach AdamW": run(steps_encodings, compiled=False, fused=False),
        "eager, fused AdamW": run(steps_encodings, compiled=False, fused=True),
        "compiled, fused AdamW": run(steps_encodings, compiled=True, fused=True),
    }
    pairs_per_step = BATCH_GROUPS * GROUP_SIZE
    base = results["eager, fused AdamW"]
    summary = {}
    for name, result in results.items():
        warm = result["seconds"][5:]  # steps 6.. (the compiled run's first steps compile)
        row = {
            "first_5_steps_s": round(sum(result["seconds"][:5]), 1),
            "step_s": round(float(np.median(warm)), 3),
            "pairs_per_s": round(pairs_per_step / float(np.median(warm)), 1),
            "optimizer_ms": round(float(np.median(result["optimizer_ms"][5:])), 1),
            "max_loss_diff_vs_eager_fused": max(
                abs(a - b) for a, b in zip(result["losses"], base["losses"], strict=True)
            ),
        }
        summary[name] = row
        print(f"{name:>24}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    eager, compiled = summary["eager, fused AdamW"], summary["compiled, fused AdamW"]
    gain = eager["step_s"] - compiled["step_s"]
    overhead = compiled["first_5_steps_s"] - 5 * compiled["step_s"]
    breakeven = overhead / gain if gain > 0 else float("inf")
    print(
        f"compiled/eager step speed {eager['step_s'] / compiled['step_s']:.2f}x; compiling costs "
        f"{overhead:.1f} s, repaid after {breakeven:.0f} steps"
    )
    out = Path(__file__).parent / "results" / "train_compile.json"
    out.write_text(json.dumps({"cpu": cpu_description(), "threads": args.threads, **summary}))


if __name__ == "__main__":
    main()

"""Benchmark: fine-tune all-MiniLM-L6-v2 on the CQA data with raykit, next to a plain PyTorch loop.

Prints (and writes to bench/results/finetune_cqa.json):
  * dev NDCG@10 / MAP of the fine-tuned model (goal: >= 0.85 / 0.75),
  * raykit's training throughput in pairs/s over the whole run (2 CPU workers),
  * a plain single-process loop's pairs/s on the same model and groups, padding each batch to its
    longest pair like FlagEmbedding's collator, 2 torch threads (goal: raykit >= 1.2x),
  * the time from launch to the first training step.

Run: python bench/finetune_cqa.py [--data ../shared/data/cqa]  (about 25 minutes on 2 cores)
The CQA data is research-only: it is read from ../shared, never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykit.config import FinetuneConfig
from raykit.core.batching import pad_encodings
from raykit.core.loading import load_model_and_tokenizer, resolve_model_path
from raykit.core.losses import group_softmax_loss
from raykit.core.tokenize import tokenize_pairs
from raykit.data.groups import load_groups, sample_group


def plain_loop_pairs_per_second(
    train_file: str, steps: int, group_size: int, batch_groups: int, max_len: int, lr: float
) -> dict:
    """The loop users write by hand: one process, batches padded to their longest pair."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(
        resolve_model_path("minilm-l6"),
        allow_untrained_head=True,  # a new head, as finetune's
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    records = load_groups(train_file)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))
    pairs = real_tokens = padded_tokens = 0
    started = time.perf_counter()
    for step in range(steps):
        chosen = [records[i] for i in order[step * batch_groups : (step + 1) * batch_groups]]
        groups = [sample_group(r, group_size, rng) for r in chosen]
        encodings = tokenize_pairs(
            tokenizer,
            [g.query for g in groups for _ in g.passages],
            [p for g in groups for p in g.passages],
            max_len,
        )
        batch = pad_encodings(encodings, tokenizer.pad_token_id)
        logits = model(**batch).logits.view(-1)
        loss = group_softmax_loss(logits, group_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pairs += len(encodings)
        real_tokens += sum(len(e["input_ids"]) for e in encodings)
        padded_tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "pairs": pairs,
        "seconds": round(seconds, 1),
        "pairs_per_s": round(pairs / seconds, 2),
        "padding": round(1 - real_tokens / padded_tokens, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cqa")
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=6e-5)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--batch_groups", type=int, default=4, help="groups per optimizer step")
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--baseline_steps", type=int, default=30)
    parser.add_argument("--skip_baseline", action="store_true")
    args = parser.parse_args()
    train_file, dev_file = f"{args.data}/train.jsonl", f"{args.data}/dev.jsonl"
    results: dict = {"args": vars(args)}

    if not args.skip_baseline:
        print("plain loop (1 process, 2 threads, pad to longest) ...", flush=True)
        results["plain_loop"] = plain_loop_pairs_per_second(
            train_file,
            args.baseline_steps,
            args.group_size,
            args.batch_groups,
            args.max_len,
            args.learning_rate,
        )
        print(json.dumps(results["plain_loop"]), flush=True)

    from raykit.training.launch import finetune

    # A Ray instance of its own: never join another cluster running on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    workers = 2
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FinetuneConfig(
            model_name_or_path="minilm-l6",
            train_data=[train_file],
            eval_data=[dev_file],
            output_dir=os.path.join(tmp, "model"),
            storage_path=os.path.join(tmp, "ray"),
            learning_rate=args.learning_rate,
            warmup_ratio=0.1,
            weight_decay=0.01,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_groups // workers,
            train_group_size=args.group_size,
            max_len=args.max_len,
            num_workers=workers,
            logging_steps=20,
            forward_token_budget=2048,
        )
        started = time.time()
        result = finetune(cfg)
        wall = time.time() - started
    summary = result.summary
    final = summary["eval"][-1]
    results["raykit"] = {
        "wall_s": round(wall, 1),
        "time_to_first_step_s": round(summary["time_to_first_step_s"], 1),
        "pairs": summary["pairs_trained"],
        "train_s": round(summary["train_seconds"], 1),
        "pairs_per_s": round(summary["pairs_trained"] / summary["train_seconds"], 2),
        "pairs_per_s_whole_run": round(summary["pairs_trained"] / wall, 2),
        "dev_before": summary["eval_before"],
        "dev_after": {k: v for k, v in final.items() if k != "step"},
    }
    if "plain_loop" in results:
        results["speedup"] = round(
            results["raykit"]["pairs_per_s"] / results["plain_loop"]["pairs_per_s"], 2
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "finetune_cqa.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    after = results["raykit"]["dev_after"]
    print(
        f"dev NDCG@10 {after['nDCG@10']:.4f} (goal 0.85)  MAP {after['AP']:.4f} (goal 0.75)  "
        f"speedup {results.get('speedup', 'n/a')}x (goal 1.2x)  "
        f"first step after {results['raykit']['time_to_first_step_s']}s"
    )


if __name__ == "__main__":
    main()

"""Benchmark: distillation from a teacher ensemble, on CQA (all-MiniLM-L6-v2 throughout).

1. Two teachers: `raykit finetune` of MiniLM on CQA train with seeds 1 and 2.
2. `raykit score` of the training groups with both teachers (`--model A --model B`): each
   group comes back with `pos_scores`/`neg_scores`, the mean of the two teachers' raw scores.
3. Two students from MiniLM with seed 3 and the same recipe: one on the plain groups, one on
   the teacher-scored groups (group softmax + KL to the teachers, `--distill_weight`).
Prints the CPU and the dev NDCG@10 / MAP of each teacher, of the teacher ensemble (its scores
of the dev groups) and of both students; writes bench/results/distill_cqa.json. No target:
the issue asks for the figures.

Run: python bench/distill_cqa.py [--data ../shared/data/cqa] [--epochs 1] [--max_len 192]
(about 30 minutes on 2 cores). The CQA data is research-only: it is read from ../shared,
never copied into the repository.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykit.config import FinetuneConfig, ScoreConfig
from raykit.core.metrics import evaluate_groups
from raykit.core.precision import cpu_description
from raykit.data.groups import load_groups


def finetune_minilm(args, train: str, dev: str, out: str, seed: int, **extra) -> dict:
    from raykit.training.launch import finetune

    cfg = FinetuneConfig(
        model_name_or_path="minilm-l6",
        train_data=[train],
        eval_data=[dev],
        output_dir=out,
        storage_path=os.path.join(os.path.dirname(out), "ray"),
        run_name=os.path.basename(out),
        learning_rate=args.learning_rate,
        warmup_ratio=0.1,
        weight_decay=0.01,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=2,
        train_group_size=8,
        max_len=args.max_len,
        num_workers=2,
        logging_steps=50,
        eval_on_start=False,
        seed=seed,
        **extra,
    )
    started = time.time()
    summary = finetune(cfg, console=False).summary
    final = summary["eval"][-1]
    return {
        "wall_s": round(time.time() - started, 1),
        "nDCG@10": round(final["nDCG@10"], 4),
        "MAP": round(final["AP"], 4),
    }


def ensemble_dev_metrics(teachers: list[str], dev: str, tmp: str, max_len: int) -> dict:
    """The teachers' mean scores of the dev groups, ranked: the ensemble's own quality."""
    from raykit.scoring.pipeline import run_score

    out = os.path.join(tmp, "dev-scored")
    run_score(ScoreConfig(model=teachers, input=[dev], output=out, format="jsonl", max_len=max_len))
    scored = [json.loads(line) for line in Path(out, "dev.jsonl").read_text().splitlines()]
    by_query = {row["query"]: row for row in scored}

    def score_pairs(pairs: list[list[str]]) -> list[float]:
        scores = []
        for query, passage in pairs:
            row = by_query[query]
            texts, values = row["pos"] + row["neg"], row["pos_scores"] + row["neg_scores"]
            scores.append(values[texts.index(passage)])
        return scores

    metrics = evaluate_groups(load_groups(dev), score_pairs)
    return {"nDCG@10": round(metrics["nDCG@10"], 4), "MAP": round(metrics["AP"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cqa")
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max_len", type=int, default=192)
    parser.add_argument("--learning_rate", type=float, default=6e-5)
    parser.add_argument("--distill_weight", type=float, default=1.0)
    args = parser.parse_args()
    train, dev = f"{args.data}/train.jsonl", f"{args.data}/dev.jsonl"
    print(f"CPU: {cpu_description()}", flush=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False)  # a Ray instance of its own
    results: dict = {"cpu": cpu_description(), "args": vars(args)}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            teachers = [os.path.join(tmp, f"teacher{seed}") for seed in (1, 2)]
            for seed, out in zip((1, 2), teachers, strict=True):
                results[f"teacher seed {seed}"] = finetune_minilm(args, train, dev, out, seed)
                print(f"teacher seed {seed}: {results[f'teacher seed {seed}']}", flush=True)
            results["teacher ensemble"] = ensemble_dev_metrics(teachers, dev, tmp, args.max_len)
            print(f"teacher ensemble: {results['teacher ensemble']}", flush=True)
            from raykit.scoring.pipeline import run_score

            scored = os.path.join(tmp, "train-scored")
            started = time.time()
            teacher_cfg = ScoreConfig(
                model=teachers, input=[train], output=scored, format="jsonl", max_len=args.max_len
            )
            run_score(teacher_cfg)
            results["teacher scoring wall_s"] = round(time.time() - started, 1)
            plain = finetune_minilm(args, train, dev, os.path.join(tmp, "student"), 3)
            results["student, groups only"] = plain
            print(f"student, groups only: {plain}", flush=True)
            distilled = finetune_minilm(
                args,
                scored,
                dev,
                os.path.join(tmp, "student-distilled"),
                3,
                distill_weight=args.distill_weight,
            )
            results["student, distilled"] = distilled
            print(f"student, distilled: {distilled}", flush=True)
    finally:
        ray.shutdown()
    gain = np.round(results["student, distilled"]["nDCG@10"] - plain["nDCG@10"], 4)
    print(f"CPU: {cpu_description()}; distillation moves the student's NDCG@10 by {gain:+}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "distill_cqa.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: a 4-trial ASHA sweep of all-MiniLM-L6-v2 on the CQA data (short budget per trial).

Prints each trial's dev NDCG@10, the exported best model's dev metrics (re-evaluated from
output_dir/best), and how many trial-steps ASHA saved against running every trial to the end.
Writes bench/results/tune_cqa.json. Run: python bench/tune_cqa.py  (about 25 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykit.config import EvaluateConfig, TuneConfig
from raykit.scoring.evaluate import evaluate_model
from raykit.training.tune import run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cqa")
    )
    parser.add_argument("--max_steps", type=int, default=16)
    parser.add_argument("--eval_steps", type=int, default=8)
    parser.add_argument("--num_samples", type=int, default=4)
    args = parser.parse_args()
    dev = f"{args.data}/dev.jsonl"
    # A Ray instance of its own: never join another cluster running on this machine. The
    # dashboard serves the state API that Ray Train's placement-group cleaner polls: without it
    # the worker group of a trial ASHA stopped keeps its CPUs and the next trial never starts.
    ray.init(address="local", num_cpus=4, include_dashboard=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TuneConfig(
            model_name_or_path="minilm-l6",
            train_data=[f"{args.data}/train.jsonl"],
            eval_data=[dev],
            output_dir=f"{tmp}/sweep",
            max_steps=args.max_steps,
            eval_steps=args.eval_steps,
            eval_on_start=False,
            warmup_ratio=0.1,
            weight_decay=0.01,
            per_device_train_batch_size=4,
            max_len=256,
            num_workers=1,
            cpus_per_worker=2,
            logging_steps=args.eval_steps,
            forward_token_budget=2048,
            search=["learning_rate=loguniform:1e-5:2e-4", "train_group_size=choice:4,8"],
            num_samples=args.num_samples,
            scheduler="asha",
            max_concurrent_trials=1,
        )
        started = time.time()
        sweep = run_sweep(cfg)
        wall = time.time() - started
        best = evaluate_model(
            EvaluateConfig(model_name_or_path=sweep["best_dir"], eval_data=[dev], max_len=256)
        )
    steps_run = sum(row["steps"] for row in sweep["trials"])
    budget = args.max_steps * len(sweep["trials"])
    results = {
        "args": vars(args),
        "wall_s": round(wall, 1),
        "trials": sweep["trials"],
        "best_model_dev": best,
        "trial_steps_run": steps_run,
        "trial_steps_budget": budget,
        "asha_saved": round(1 - steps_run / budget, 3),
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "tune_cqa.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

"""Benchmark: does mining hard negatives help, and what does mixing with the base model cost?

On the CQA data, fine-tunes all-MiniLM-L6-v2 three times with the same budget:
  (a) the given negatives, (b) BM25-mined negatives from the pooled CQA train comments
  (`raykit mine --retriever bm25 --range 10-100 --negatives 15 --replace_neg`), (c) both,
and reports dev NDCG@10 / MAP for each; then mixes the best of them with its base model
(`raykit mix`, fine-tuned weight 0.3 / 0.5 / 0.7) and reports dev metrics for each mix.
Writes bench/results/mine_cqa.json. Run: python bench/mine_cqa.py  (about 45 minutes on 2 cores)
The CQA data is research-only: it is read from ../shared, never copied into the repository.
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

from raykit.config import EvaluateConfig, FinetuneConfig, MineConfig, MixConfig
from raykit.mining.mine import run_mine
from raykit.scoring.evaluate import evaluate_model
from raykit.tools.mix import run_mix
from raykit.training.launch import finetune


def rounded(metrics: dict) -> dict:
    return {k: round(v, 4) for k, v in metrics.items() if k in ("nDCG@10", "AP", "RR@10")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cqa")
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=6e-5)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--range", default="10-100")
    parser.add_argument("--negatives", type=int, default=15)
    args = parser.parse_args()
    train, dev = f"{args.data}/train.jsonl", f"{args.data}/dev.jsonl"
    results: dict = {"args": vars(args), "arms": {}, "mixes": {}}
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        mined, both = f"{tmp}/mined.jsonl", f"{tmp}/both.jsonl"
        started = time.time()
        common = {"input": [train], "range": args.range, "negatives": args.negatives}
        results["mine_replace"] = run_mine(MineConfig(**common, output=mined, replace_neg=True))
        results["mine_add"] = run_mine(MineConfig(**common, output=both))
        results["mine_s"] = round(time.time() - started, 1)

        models = {}
        for arm, data in [("given", train), ("bm25_mined", mined), ("given+bm25", both)]:
            cfg = FinetuneConfig(
                model_name_or_path="minilm-l6",
                train_data=[data],
                eval_data=[dev],
                output_dir=f"{tmp}/{arm}",
                storage_path=f"{tmp}/ray",
                run_name=f"mine-{arm}",
                learning_rate=args.learning_rate,
                warmup_ratio=0.1,
                weight_decay=0.01,
                num_train_epochs=args.epochs,
                per_device_train_batch_size=2,
                train_group_size=8,
                max_len=args.max_len,
                num_workers=2,
                logging_steps=20,
                eval_on_start=False,
                forward_token_budget=2048,
            )
            started = time.time()
            result = finetune(cfg)
            models[arm] = result.output_dir
            results["arms"][arm] = {
                "dev": rounded(result.summary["eval"][-1]),
                "train_s": round(time.time() - started, 1),
                "pairs": result.summary["pairs_trained"],
            }
            print(f"[bench] {arm}: {results['arms'][arm]}", flush=True)

        best = max(results["arms"], key=lambda a: results["arms"][a]["dev"]["nDCG@10"])
        results["best_arm"] = best
        for weight in (0.3, 0.5, 0.7):
            out = f"{tmp}/mix-{weight}"
            weights = [str(round(1 - weight, 6)), str(weight)]
            run_mix(MixConfig(models=["minilm-l6", models[best]], weights=weights, output=out))
            dev_metrics = evaluate_model(
                EvaluateConfig(model_name_or_path=out, eval_data=[dev], max_len=args.max_len)
            )
            results["mixes"][f"fine_tuned_{weight}"] = rounded(dev_metrics)
            print(f"[bench] mix {weight}: {results['mixes'][f'fine_tuned_{weight}']}", flush=True)
    ray.shutdown()
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "mine_cqa.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

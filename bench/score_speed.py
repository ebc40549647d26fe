"""Benchmark: `raykit score` (whole command, its defaults) against a single-process length-sorted
loop and FlagReranker, at fp32 and bf16, on CQA dev pairs and on short QA-style pairs.

Data (read from ../shared, never copied): the 2,090 CQA dev (query, comment) pairs (~109 tokens)
and "short" pairs cut from them (the query's first 12 words, the comment's first 20: ~40 tokens);
`--pairs N` repeats each to N pairs for the whole-command runs.
Model: a one-logit cross-encoder fine-tuned by raykit (default: the quickstart's
output/minilm-sample), so NDCG@10 at bf16 vs fp32 is measured on a real ranking.

Per dataset and precision it prints:
- loop: one process, 2 torch threads, all pairs sorted by length, batches of 64 padded to their
  longest (bf16: the weights cast, as raykit does on CPU); pairs/s after the model is loaded,
  padding ratio, GFLOP/s and its fraction of this CPU's fp32 / bf16 peak.
- flagreranker (fp32 only, its peers' venv): `FlagReranker(DIR, use_fp16=False,
  devices=["cpu"]).compute_score` on the dev-sized set, pairs/s.
- raykit: `raykit score --model DIR --input N_PAIRS.jsonl --output OUT [--dtype bfloat16]` as a
  user runs it; whole-command pairs/s (its process start to exit), steady-state pairs/s (after
  the first scores), time to first scores, and the ratios the issue asks for.

  `--compile on`: the dev-set run compiles the package (into a fresh folder) and the
  whole-command run restores it, as a second run on a node does.

Run: python bench/score_speed.py [--pairs 100000] [--datasets cqa,short]
     [--dtypes float32,bfloat16] [--compile auto|on|off]  (writes bench/results/score_speed.json)
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

import torch  # noqa: E402

from bench.score_cqa import model_flops  # noqa: E402
from bench.score_cqa import write_pairs as write_rows  # noqa: E402
from raykit.core.precision import cpu_description, cpu_has_native  # noqa: E402

FLAG_SCRIPT = """
import json, sys, time
from FlagEmbedding import FlagReranker
model, path = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(path)]
pairs = [[r["query"], r["passage"]] for r in rows]
reranker = FlagReranker(model, use_fp16=False, devices=["cpu"])
reranker.compute_score(pairs[:64])
started = time.perf_counter()
reranker.compute_score(pairs)
print(json.dumps({"pairs": len(pairs), "wall_s": time.perf_counter() - started}))
"""


def dev_rows(dev: Path, short: bool) -> list[dict]:
    rows = []
    for q, line in enumerate(dev.read_text().splitlines()):
        group = json.loads(line)
        labelled = [(p, 1) for p in group["pos"]] + [(p, 0) for p in group["neg"]]
        for d, (passage, label) in enumerate(labelled):
            query = group["query"]
            if short:
                query, passage = " ".join(query.split()[:12]), " ".join(passage.split()[:20])
            rows.append(
                {"query_id": q, "doc_id": d, "label": label, "query": query, "passage": passage}
            )
    return rows


def cpu_peaks(cores: int) -> dict:
    """fp32 and bf16 peaks of an AVX-512 Zen 4 core: two 256-bit FMA pipes (16 fp32 FMAs, 32
    FLOP per cycle) and VDPBF16PS at twice that; clock from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text()
    mhz = [float(x) for x in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)]
    ghz = max(mhz) / 1000 if mhz else 2.45
    fp32 = cores * ghz * 1e9 * 32
    return {
        "ghz": round(ghz, 2),
        "fp32_gflops": round(fp32 / 1e9, 1),
        "bf16_gflops": round(2 * fp32 / 1e9, 1),
    }


def loop(model_dir: str, rows: list[dict], dtype: str, max_len: int = 512) -> dict:
    """One process, sorted by length, batches of 64 padded to the longest."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    started = time.perf_counter()
    encoded = tokenizer(
        [r["query"] for r in rows],
        [r["passage"] for r in rows],
        truncation="only_second",
        max_length=max_len,
    )
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    padded = 0
    scores = [0.0] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            batch = tokenizer.pad(
                {k: [encoded[k][i] for i in index] for k in encoded}, return_tensors="pt"
            )
            padded += batch["input_ids"].numel()
            logits = model(**batch).logits.view(-1).float().tolist()
            for i, value in zip(index, logits, strict=True):
                scores[i] = value
    wall = time.perf_counter() - started
    return {
        "pairs": len(rows),
        "wall_s": round(wall, 1),
        "pairs_per_s": round(len(rows) / wall, 1),
        "padding_ratio": round(1 - sum(lengths) / padded, 3),
        "gflops_per_s": round(model_flops(lengths) / wall / 1e9, 1),
        "scores": scores,
    }


def flag_reranker(python: str, model_dir: str, path: Path) -> dict | None:
    if not os.path.exists(python):
        print(f"skipping FlagReranker: {python} not found", flush=True)
        return None
    script = path.parent / "flag_bench.py"
    script.write_text(FLAG_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [python, str(script), model_dir, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    figures["pairs_per_s"] = round(figures["pairs"] / figures["wall_s"], 1)
    return figures


def raykit_score(model_dir: str, path: Path, out: Path, dtype: str, compile: str) -> dict:
    """`raykit score` as a user runs it (a fresh local Ray instance, its defaults)."""
    command = [
        sys.executable,
        "-m",
        "raykit.cli",
        "score",
        "--model",
        model_dir,
        "--input",
        str(path),
        "--output",
        str(out),
        "--overwrite",
        "--dtype",
        dtype,
        "--compile",
        compile,
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""}
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    line = next(x for x in done.stdout.splitlines() if x.startswith("[raykit] score summary: "))
    summary = json.loads(line.split(": ", 1)[1])
    pairs, first = summary["pairs_scored"], summary["first_output_s"]
    steady = (pairs - min(pairs, 1024)) / max(summary["wall_s"] - first, 1e-9)
    return {
        "pairs": pairs,
        "command_s": round(wall, 1),
        "pairs_per_s": round(pairs / wall, 1),
        "steady_pairs_per_s": round(steady, 1),
        "first_output_s": first,
        "plan": next((x for x in done.stdout.splitlines() if "scoring with" in x), ""),
        "stderr_lines": len(done.stderr.splitlines()),
    }


def ndcg10(rows: list[dict], scores: list[float]) -> float:
    """Mean nDCG@10 (ir-measures, ties pessimistic) over the queries with a relevant pair."""
    from raykit.core.metrics import group_qrels_and_run, mean_metrics, per_query_sums

    by_query: dict = {}
    for row, score in zip(rows, scores, strict=True):
        by_query.setdefault(row["query_id"], ([], []))
        by_query[row["query_id"]][0].append(score)
        by_query[row["query_id"]][1].append(row["label"])
    judged = [(s, labels) for s, labels in by_query.values() if any(labels)]
    qrels, run = group_qrels_and_run([lab for _, lab in judged], [s for s, _ in judged])
    return round(mean_metrics(per_query_sums(["nDCG@10"], qrels, run, len(judged)))["nDCG@10"], 4)


def scored_dev(out: Path, rows: list[dict]) -> list[float]:
    import pyarrow.parquet as pq

    table = pq.read_table(next(out.glob("*.parquet"))).to_pylist()
    return [r["score"] for r in table[: len(rows)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cqa"))
    parser.add_argument("--model", default=str(ROOT / "output/minilm-sample"))
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--datasets", default="short,cqa")
    parser.add_argument("--peers_python", default=str(ROOT.parent / "peers/bin/python"))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--compile",
        default="auto",
        help="raykit score's --compile; the packages go to a fresh folder, so with `on` the "
        "dev-set run compiles and the whole-command run restores",
    )
    args = parser.parse_args()
    os.environ["RAYKIT_CACHE"] = tempfile.mkdtemp(prefix="raykit-score-speed-cache-")
    cores = os.cpu_count() or 1
    peaks = cpu_peaks(cores)
    results: dict = {"args": vars(args), "cores": cores, "cpu_peaks": peaks}
    results["cpu"] = cpu_description()
    if not cpu_has_native("bfloat16"):
        results["bfloat16"] = "skipped: this CPU has no native bf16 (raykit refuses it)"
    print(json.dumps(results), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="raykit-score-speed-"))
    for name in args.datasets.split(","):
        rows = dev_rows(Path(args.data) / "dev.jsonl", short=name == "short")
        dev_path = write_rows(tmp / f"{name}_dev.jsonl", rows, len(rows))
        big_path = write_rows(tmp / f"{name}_{args.pairs}.jsonl", rows, args.pairs)
        part: dict = {"dev_pairs": len(rows)}
        flag = flag_reranker(args.peers_python, args.model, dev_path)
        part["flagreranker_fp32"] = flag
        print(json.dumps({name: {"flagreranker_fp32": flag}}), flush=True)
        dtypes = [d for d in args.dtypes.split(",") if d != "bfloat16" or cpu_has_native(d)]
        for dtype in dtypes:
            plain = loop(args.model, rows, dtype)
            peak = peaks["bf16_gflops" if dtype == "bfloat16" else "fp32_gflops"]
            plain["fraction_of_peak"] = round(plain["gflops_per_s"] / peak, 3)
            plain["ndcg@10"] = ndcg10(rows, plain.pop("scores"))
            raykit_dev = raykit_score(
                args.model, dev_path, tmp / f"out-{name}-{dtype}", dtype, args.compile
            )
            ndcg = ndcg10(rows, scored_dev(tmp / f"out-{name}-{dtype}", rows))
            whole = raykit_score(
                args.model, big_path, tmp / f"out-{name}-big-{dtype}", dtype, args.compile
            )
            whole["ndcg@10_dev"] = ndcg
            whole["dev_run_pairs_per_s"] = raykit_dev["pairs_per_s"]
            whole["steady_over_loop"] = round(whole["steady_pairs_per_s"] / plain["pairs_per_s"], 2)
            whole["command_over_loop"] = round(whole["pairs_per_s"] / plain["pairs_per_s"], 2)
            if flag:
                whole["command_over_flagreranker_fp32"] = round(
                    whole["pairs_per_s"] / flag["pairs_per_s"], 2
                )
            part[f"loop_{dtype}"], part[f"raykit_{dtype}"] = plain, whole
            print(
                json.dumps({name: {f"loop_{dtype}": plain, f"raykit_{dtype}": whole}}), flush=True
            )
        if "raykit_bfloat16" in part and "raykit_float32" in part:
            part["ndcg@10_bf16_minus_fp32"] = round(
                part["raykit_bfloat16"]["ndcg@10_dev"] - part["raykit_float32"]["ndcg@10_dev"], 4
            )
        results[name] = part
        big_path.unlink()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "score_speed.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

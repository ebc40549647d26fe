"""Benchmark: `raykit score` vs a plain Hugging Face loop, and peak memory at 100k vs 1M pairs.

throughput (default): all-MiniLM-L6-v2 (+ new head) on the CQA dev pairs (209 queries x 10
  comments = 2,090 pairs), and optionally on N pairs built by repeating them (--large N). The
  plain loop is what users write by hand: batches of 32 in input order, padded to the longest
  pair, 2 torch threads. Prints pairs/s, tokens/s and achieved FLOP/s against the CPU's fp32
  peak (2 x 256-bit FMA per cycle per core on AVX2 Zen/Skylake cores, x cores x clock).
memory (--memory): the same pipeline, with its default windows and batches, on 100k, 300k and
  1M pairs with a tiny random model, so that a run takes minutes; peak memory (sum of PSS over
  the driver and every Ray process, sampled every 0.5 s), and the peak within each quarter of
  a run, show whether memory grows with the input.

Run: python bench/score_cqa.py [--large 100000] [--memory]   (adds to bench/results/score_cqa.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from raykit.config import ScoreConfig
from raykit.core.loading import resolve_model_path
from raykit.scoring.pipeline import run_score

MINILM_LINEAR_FLOPS_PER_TOKEN = 2 * 10.6e6  # 2 x weights outside the embeddings
MINILM_LAYERS, MINILM_HIDDEN = 6, 384


def pair_rows(dev: Path) -> list[dict]:
    rows = []
    for q, line in enumerate(dev.read_text().splitlines()):
        group = json.loads(line)
        for d, passage in enumerate(group["pos"] + group["neg"]):
            rows.append({"query_id": q, "doc_id": d, "query": group["query"], "passage": passage})
    return rows


def write_pairs(path: Path, rows: list[dict], total: int) -> Path:
    with open(path, "w") as f:
        for i in range(total):
            row = rows[i % len(rows)]
            f.write(json.dumps({**row, "query_id": f"{i // len(rows)}-{row['query_id']}"}) + "\n")
    return path


def model_flops(lengths: list[int]) -> float:
    """Linear layers 2 x 10.6M per token plus attention 4 x n^2 x d per layer."""
    linear = MINILM_LINEAR_FLOPS_PER_TOKEN * sum(lengths)
    attention = sum(4 * n * n * MINILM_HIDDEN * MINILM_LAYERS for n in lengths)
    return linear + attention


def cpu_peak_flops(cores: int, ghz: float) -> float:
    return cores * ghz * 1e9 * 2 * 8 * 2  # 2 FMA pipes x 8 fp32 lanes x 2 FLOPs


def matmul_flops(threads: int) -> float:
    """What torch's sgemm reaches on this CPU with `threads` threads: a practical ceiling."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    started = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - started)


def plain_loop(model_dir: str, rows: list[dict], max_len: int) -> dict:
    """Batches of 32 in input order, padded to the longest pair, 2 threads."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    started = time.perf_counter()
    tokens = padded = 0
    lengths = []
    with torch.inference_mode():
        for start in range(0, len(rows), 32):
            batch = rows[start : start + 32]
            enc = tokenizer(
                [r["query"] for r in batch],
                [r["passage"] for r in batch],
                padding=True,
                truncation="only_second",
                max_length=max_len,
                return_tensors="pt",
            )
            model(**enc)
            real = enc["attention_mask"].sum(dim=1).tolist()
            lengths += real
            tokens += sum(real)
            padded += enc["input_ids"].numel()
    wall = time.perf_counter() - started
    return {
        "pairs": len(rows),
        "wall_s": round(wall, 1),
        "pairs_per_s": round(len(rows) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "padding_share": round(1 - tokens / padded, 3),
        "flops": model_flops(lengths),
    }


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants (the local Ray instance's
    GCS, raylet, workers and actors) every 0.5 s. Other Ray clusters on the machine do not count."""

    def __init__(self):
        self.peak = 0
        self.at_peak: dict[str, dict[str, int]] = {}
        self.series: list[tuple[float, int]] = []  # (seconds since start, total PSS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree() -> list[int]:
        children: dict[int, list[int]] = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(pid))
        tree, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def _sample(self) -> dict[str, dict[str, int]]:
        """{process name: {"anon", "shmem", "file": PSS bytes}} for the process tree."""
        sample: dict[str, dict[str, int]] = {}
        for pid in self._tree():
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            except OSError:
                continue
            if pid == os.getpid():
                name = "driver"
            parts = sample.setdefault(name, {"anon": 0, "shmem": 0, "file": 0})
            for line in rollup:
                for kind in parts:
                    if line.startswith(f"Pss_{kind.capitalize()}:"):
                        parts[kind] += int(line.split()[1]) * 1024
        return sample

    def _run(self) -> None:
        started = time.perf_counter()
        while not self.stop.is_set():
            sample = self._sample()
            total = sum(sum(parts.values()) for parts in sample.values())
            self.series.append((time.perf_counter() - started, total))
            if total > self.peak:
                self.peak, self.at_peak = total, sample
            time.sleep(0.5)

    def breakdown(self) -> dict[str, float]:
        """GiB at the peak by kind (anon: private heaps; shmem: Ray's object store) and by the
        biggest processes."""
        gib = 2**30
        kinds = {
            k: round(sum(p[k] for p in self.at_peak.values()) / gib, 2)
            for k in ("anon", "shmem", "file")
        }
        by_process = sorted(self.at_peak.items(), key=lambda kv: -sum(kv[1].values()))[:6]
        return {
            **kinds,
            "processes": {name: round(sum(p.values()) / gib, 2) for name, p in by_process},
        }

    def quarters(self) -> list[float]:
        """GiB: the peak within each quarter of the run. Flat from the second quarter on means
        memory stopped growing once the pipeline was full."""
        end = self.series[-1][0]
        peaks = [0] * 4
        for t, total in self.series:
            quarter = min(3, int(4 * t / end)) if end else 0
            peaks[quarter] = max(peaks[quarter], total)
        return [round(p / 2**30, 2) for p in peaks]

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def raykit_run(model: str, source: Path, out: Path, max_len: int, actors: int, **options) -> dict:
    """Throughput runs: windows of 256 (the dev set is 2,090 pairs) and CPU-sized forwards.
    The speed of MiniLM's untrained head is the same as a trained one's."""
    options = {
        "allow_untrained_head": True,
        "batch_size": 64,
        "forward_token_budget": 2048,
        "sort_window": 256,
        **options,
    }
    cfg = ScoreConfig(
        model=model,
        input=[str(source)],
        output=str(out),
        overwrite=True,
        max_len=max_len,
        num_actors=actors,
        cpus_per_actor=2 / actors,
        **options,
    )
    return run_score(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cqa"))
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpu_ghz", type=float, default=2.45, help="EPYC Milan base clock")
    parser.add_argument("--large", type=int, default=0, help="also N pairs with MiniLM")
    parser.add_argument(
        "--memory", action="store_true", help="peak memory by input size, tiny model"
    )
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--object_store_gib", type=float, default=2.0, help="--memory runs")
    parser.add_argument("--object_store_limit_mib", type=int, default=256, help="--memory runs")
    parser.add_argument(
        "--memory_sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000]
    )
    args = parser.parse_args()
    rows = pair_rows(Path(args.data) / "dev.jsonl")
    model = resolve_model_path("minilm-l6")
    cores = os.cpu_count() or 1
    results: dict = {"args": vars(args), "cores": cores}
    peak = cpu_peak_flops(cores, args.cpu_ghz)
    results["cpu_fp32_peak_gflops"] = round(peak / 1e9, 1)
    results["torch_sgemm_gflops"] = round(matmul_flops(cores) / 1e9, 1)
    tmp = Path(tempfile.mkdtemp(prefix="raykit-score-bench-"))
    dev_pairs = write_pairs(tmp / "dev_pairs.jsonl", rows, len(rows))
    if not args.skip_throughput:
        plain = plain_loop(model, rows, args.max_len)
        plain["gflops_per_s"] = round(plain.pop("flops") / plain["wall_s"] / 1e9, 1)
        plain["fraction_of_peak"] = round(plain["gflops_per_s"] * 1e9 / peak, 3)
        results["plain_loop_dev"] = plain
        print(json.dumps({"plain_loop_dev": plain}), flush=True)
    if not args.skip_throughput:
        # A Ray instance of its own: never join another cluster running on this machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        summary = raykit_run(model, dev_pairs, tmp / "out-dev", args.max_len, args.actors)
        # FLOPs of the pairs raykit scored: the same pairs, truncated the same way.
        flops_per_pair = model_flops_of(model, rows, args.max_len)
        summary["gflops_per_s"] = round(flops_per_pair / summary["wall_s"] / 1e9, 1)
        summary["fraction_of_peak"] = round(summary["gflops_per_s"] * 1e9 / peak, 3)
        summary["speedup_vs_plain"] = round(summary["pairs_per_s"] / plain["pairs_per_s"], 2)
        results["raykit_dev"] = summary
        print(json.dumps({"raykit_dev": summary}), flush=True)
        if args.large:
            large = write_pairs(tmp / "pairs_large.jsonl", rows, args.large)
            summary = raykit_run(model, large, tmp / "out-large", args.max_len, args.actors)
            summary["speedup_vs_plain"] = round(summary["pairs_per_s"] / plain["pairs_per_s"], 2)
            results[f"raykit_{args.large}"] = summary
            print(json.dumps({f"raykit_{args.large}": summary}), flush=True)
        ray.shutdown()
    if args.memory:
        from tests.helpers import build_tiny_reranker

        tiny = build_tiny_reranker(tmp / "tiny")
        defaults = ScoreConfig()  # the pipeline's own windows and batches, not the bench's
        memory_options = {
            "batch_size": defaults.batch_size,
            "sort_window": defaults.sort_window,
            "forward_token_budget": defaults.forward_token_budget,
            "object_store_limit_mib": args.object_store_limit_mib,
        }
        for total in args.memory_sizes:
            source = write_pairs(tmp / f"pairs_{total}.jsonl", rows, total)
            with PeakMemory() as memory:
                # A fresh Ray instance per size: neither run inherits the other's object-store
                # pages. The store is capped as a deployment would cap it (Ray's default is 30%
                # of RAM), so its pages are bounded whatever the input size.
                ray.init(
                    address="local",
                    num_cpus=4,
                    include_dashboard=False,
                    object_store_memory=int(args.object_store_gib * 2**30),
                )
                ray.data.DataContext.get_current().enable_progress_bars = False
                try:
                    summary = raykit_run(
                        tiny, source, tmp / f"out-{total}", 128, args.actors, **memory_options
                    )
                finally:
                    ray.shutdown()
            summary["peak_pss_gib"] = round(memory.peak / 2**30, 2)
            summary["peak_pss_breakdown_gib"] = memory.breakdown()
            summary["peak_pss_by_quarter_gib"] = memory.quarters()
            results[f"memory_{total}"] = summary
            print(json.dumps({f"memory_{total}": summary}), flush=True)
            source.unlink()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    # Runs of different parts (--skip_throughput --memory, then --large) add to one file.
    path = out / "score_cqa.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    earlier.pop("args", None)
    results = {**earlier, **results}
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def model_flops_of(model_dir: str, rows: list[dict], max_len: int) -> float:
    from transformers import AutoTokenizer

    from raykit.core.tokenize import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encodings = tokenize_pairs(
        tokenizer, [r["query"] for r in rows], [r["passage"] for r in rows], max_len
    )
    return model_flops([len(e["input_ids"]) for e in encodings])


if __name__ == "__main__":
    main()

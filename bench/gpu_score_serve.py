"""GPU check of `raykit score` (num_gpus=1 actors, fp16) and `raykit serve` (GPU replica, fp16),
run on a lent GPU machine (never in CI). A random MiniLM-shaped BERT (6 layers, hidden 384) stands
in for all-MiniLM-L6-v2: same shapes, same FLOPs, no download.

Run: python bench/gpu_score_serve.py [--pairs 300000]   (prints one JSON line per check)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from raykit.config import ScoreConfig, ServeConfig
from raykit.core.reranker import Reranker
from tests.helpers import build_tiny_reranker  # noqa: E402


def emit(check: str, **figures) -> None:
    print(json.dumps({"check": check, **figures}), flush=True)


def sample_pairs() -> list[dict]:
    """The sample dev groups, passages lengthened to ~100-200 tokens like CQA comments."""
    rows = []
    for q, line in enumerate((ROOT / "examples/data/dev.jsonl").read_text().splitlines()):
        group = json.loads(line)
        for d, passage in enumerate(group["pos"] + group["neg"]):
            rows.append(
                {
                    "query_id": q,
                    "doc_id": d,
                    "query": group["query"],
                    "passage": " ".join([passage] * (1 + (q + d) % 5)),
                }
            )
    return rows


def check_score(model_dir: str, tmp: Path, total: int) -> None:
    from raykit.scoring.pipeline import run_score

    rows = sample_pairs()
    source = tmp / "pairs.jsonl"
    with open(source, "w") as f:
        for i in range(total):
            f.write(json.dumps({**rows[i % len(rows)], "n": i}) + "\n")
    for actors in (1,):
        cfg = ScoreConfig(
            model=model_dir,
            input=[str(source)],
            output=str(tmp / "scored"),
            overwrite=True,
            use_gpu=True,
            fp16=True,
            num_actors=actors,
            batch_size=512,
            forward_token_budget=65536,
            sort_window=4096,
            max_len=256,
        )
        summary = run_score(cfg)
        emit("score_use_gpu_fp16", actors=actors, **summary)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(
        tmp / "scored" / "pairs.parquet", columns=["n", "query", "passage", "score"]
    )
    ns = table["n"].to_numpy()
    first = table.filter(pa.array(ns < len(rows))).to_pylist()
    reference = Reranker(model_dir, device="cuda", max_length=256).compute_score(
        [[r["query"], r["passage"]] for r in first]
    )
    diff = float(np.max(np.abs(np.array([r["score"] for r in first]) - reference)))
    emit(
        "score_exactly_once_and_vs_fp32",
        rows=len(ns),
        unique=len(set(ns.tolist())),
        expected=total,
        max_abs_diff_fp16_vs_fp32=diff,
    )


def check_memory(model_dir: str, tmp: Path) -> None:
    """Peak memory (PSS of the driver + every Ray process) at 100k and 1M pairs, GPU actors."""
    from bench.score_cqa import PeakMemory
    from raykit.scoring.pipeline import run_score

    rows = sample_pairs()
    for total in (100_000, 1_000_000):
        source = tmp / f"pairs_{total}.jsonl"
        with open(source, "w") as f:
            for i in range(total):
                f.write(json.dumps({**rows[i % len(rows)], "n": i}) + "\n")
        cfg = ScoreConfig(
            model=model_dir,
            input=[str(source)],
            output=str(tmp / f"m{total}"),
            overwrite=True,
            use_gpu=True,
            fp16=True,
            batch_size=512,
            forward_token_budget=65536,
            sort_window=4096,
            max_len=256,
        )
        with PeakMemory() as memory:
            summary = run_score(cfg)
        emit(
            "score_memory",
            pairs=total,
            peak_pss_gib=round(memory.peak / 2**30, 2),
            wall_s=summary["wall_s"],
            pairs_per_s=summary["pairs_per_s"],
            rows_out=summary["rows_out"],
        )
        source.unlink()


def check_serve(model_dir: str) -> None:
    import httpx
    from ray import serve

    from raykit.serving.app import build_app

    cfg = ServeConfig(
        model=model_dir,
        use_gpu=True,
        fp16=True,
        max_len=256,
        port=8123,
        max_batch_size=256,
        max_batch_tokens=65536,
        batch_wait_timeout_s=0.005,
        max_ongoing_requests=128,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(cfg), name="gpu", route_prefix="/")
    url = f"http://127.0.0.1:{cfg.port}"
    info = httpx.get(url + "/info").json()
    rows = sample_pairs()
    docs = [r["passage"] for r in rows[:20]]
    query = rows[0]["query"]
    reply = httpx.post(url + "/rerank", json={"query": query, "texts": docs, "raw_scores": True})
    reference = Reranker(model_dir, device="cuda", max_length=256).compute_score(
        [[query, d] for d in docs]
    )
    got = {r["index"]: r["score"] for r in reply.json()}
    diff = max(abs(got[i] - reference[i]) for i in range(len(docs)))
    emit(
        "serve_gpu_replica",
        device=info["device"],
        dtype=info["dtype"],
        max_abs_diff_fp16_vs_fp32=diff,
    )

    async def load(clients: int, seconds: float) -> dict:
        latencies: list[float] = []
        errors = 0

        async def client(session: httpx.AsyncClient) -> None:
            nonlocal errors
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                r = await session.post(url + "/v1/rerank", json={"query": query, "documents": docs})
                latencies.append(time.perf_counter() - started)
                errors += r.status_code != 200

        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as session:
            started = time.perf_counter()
            await asyncio.gather(*(client(session) for _ in range(clients)))
            wall = time.perf_counter() - started
        lat = np.array(latencies) * 1000
        return {
            "clients": clients,
            "requests": len(lat),
            "errors": errors,
            "requests_per_s": round(len(lat) / wall, 1),
            "documents_per_s": round(20 * len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
        }

    before = httpx.get(url + "/info").json()["replica_stats"]["forward_passes"]
    for clients in (1, 32):
        emit("serve_gpu_load", **asyncio.run(load(clients, 15)))
    after = httpx.get(url + "/info").json()["replica_stats"]
    emit(
        "serve_gpu_batching",
        forward_passes=after["forward_passes"] - before,
        pairs_scored=after["pairs_scored"],
    )
    serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=300_000)
    parser.add_argument("--only", choices=["score", "serve", "memory"], default=None)
    args = parser.parse_args()
    emit("device", name=torch.cuda.get_device_name(0), torch=torch.__version__, ray=ray.__version__)
    tmp = Path(tempfile.mkdtemp())
    model_dir = build_tiny_reranker(tmp / "minilm-shaped", hidden_size=384, layers=6)
    ray.init(num_gpus=1, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name, check in (
        ("score", lambda: check_score(model_dir, tmp, args.pairs)),
        ("serve", lambda: check_serve(model_dir)),
        ("memory", lambda: check_memory(model_dir, tmp)),
    ):
        if args.only and name != args.only:
            continue
        try:
            check()
        except Exception as exc:  # report and go on: one failed check must not hide the other
            emit(f"{name}_failed", error=repr(exc)[:2000])
    ray.shutdown()


if __name__ == "__main__":
    main()

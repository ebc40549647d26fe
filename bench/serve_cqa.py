"""Benchmark: `raykit serve` vs a naive FastAPI + transformers server under concurrent load.

Requests carry 20 CQA dev comments (two dev groups' candidates) for the first group's query, the
Cohere /v1/rerank shape. Each server runs the same model (all-MiniLM-L6-v2 + new head) on this
machine's CPUs; the load generator (asyncio + httpx) runs 1, 8 and 32 concurrent clients for a
fixed time each, then 2x the saturating load against raykit to count non-429 errors.

naive: one uvicorn process, an `async def` route that runs the model inline (one request at a
  time, no batching), the request's 20 documents padded to the longest, 2 torch threads.
raykit: Ray Serve, an ingress + model replicas with one token-budgeted queue of pairs per replica,
  length-sorted chunks of 1024 padded tokens, no per-request access log (uvicorn's is off too).

Run: python bench/serve_cqa.py [--seconds 90 --warmup 20]   (writes bench/results/serve_cqa.json)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

NAIVE_SERVER = """
import sys, torch
from fastapi import FastAPI
from transformers import AutoModelForSequenceClassification, AutoTokenizer
torch.set_num_threads(2)
path, max_len = sys.argv[1], int(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
app = FastAPI()

@app.post("/v1/rerank")
async def rerank(body: dict):
    docs = body["documents"]
    enc = tokenizer([body["query"]] * len(docs), docs, padding=True, truncation="only_second",
                    max_length=max_len, return_tensors="pt")
    with torch.inference_mode():
        scores = torch.sigmoid(model(**enc).logits.view(-1)).tolist()
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    return {"results": [{"index": i, "relevance_score": scores[i]} for i in order]}

@app.get("/health")
async def health():
    return {"status": "ok"}

if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DOCS_PER_REQUEST = 20


def requests_from(dev: Path) -> list[dict]:
    groups = [json.loads(line) for line in dev.read_text().splitlines()]
    bodies = []
    for a, b in zip(groups[0::2], groups[1::2], strict=False):
        docs = (a["pos"] + a["neg"] + b["pos"] + b["neg"])[:DOCS_PER_REQUEST]
        bodies.append({"query": a["query"], "documents": docs})
    return bodies


async def run_load(
    url: str, bodies: list[dict], clients: int, seconds: float, warmup: float = 0
) -> dict:
    """`clients` closed-loop clients for `warmup` + `seconds`. Figures cover the requests that
    finished inside the measured window: the warm-up (queues filling) and the drain afterwards
    (fewer clients) are left out, for every server alike."""
    finished: list[tuple[float, float, int]] = []  # (started, ended, status)

    async def client(session: httpx.AsyncClient, offset: int, deadline: float) -> None:
        i = offset
        while time.perf_counter() < deadline:
            body = bodies[i % len(bodies)]
            i += clients
            started = time.perf_counter()
            try:
                reply = await session.post(url + "/v1/rerank", json=body)
                code = reply.status_code
            except httpx.HTTPError:
                code = -1
            finished.append((started, time.perf_counter(), code))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as session:
        window_start = time.perf_counter() + warmup
        window_end = window_start + seconds
        await asyncio.gather(*(client(session, k, window_end) for k in range(clients)))
    in_window = [(s, e, c) for s, e, c in finished if window_start <= e <= window_end]
    codes: dict[int, int] = {}
    for _, _, code in in_window:
        codes[code] = codes.get(code, 0) + 1
    ok = [e - s for s, e, c in in_window if c == 200]
    lat = np.array(ok or [float("nan")]) * 1000
    return {
        "clients": clients,
        "ok": len(ok),
        "status_counts": {str(k): v for k, v in sorted(codes.items())},
        "requests_per_s": round(len(ok) / seconds, 2),
        "documents_per_s": round(len(ok) * DOCS_PER_REQUEST / seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def wait_healthy(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become healthy")


def bench(
    name: str, url: str, bodies: list[dict], levels: list[int], seconds: float, warmup: float
) -> list:
    asyncio.run(run_load(url, bodies, 2, 5))  # first requests: lazy imports, allocator
    rows = []
    for clients in levels:
        row = {"server": name, **asyncio.run(run_load(url, bodies, clients, seconds, warmup))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cqa"))
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=90, help="measured window per level")
    parser.add_argument("--warmup", type=float, default=20, help="unmeasured ramp-up per level")
    parser.add_argument("--replicas", type=int, default=2, help="CPU replicas, 2/N threads each")
    parser.add_argument("--max_batch_size", type=int, default=160, help="pairs per batch")
    parser.add_argument("--chunk_tokens", type=int, default=1024)
    parser.add_argument("--skip_naive", action="store_true")
    args = parser.parse_args()
    from raykit.config import ServeConfig, resolve_model_path

    model = resolve_model_path(args.model)
    bodies = requests_from(Path(args.data) / "dev.jsonl")
    levels = [1, 8, 32]
    results: dict = {"args": vars(args), "requests": len(bodies), "documents_per_request": 20}
    rows = []
    if not args.skip_naive:
        port = free_port()
        script = Path("/tmp") / f"raykit_naive_server_{port}.py"
        script.write_text(NAIVE_SERVER)
        env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
        server = subprocess.Popen([sys.executable, str(script), model, str(args.max_len),
                                   str(port)], env=env)  # fmt: skip
        try:
            wait_healthy(f"http://127.0.0.1:{port}")
            rows += bench(
                "naive", f"http://127.0.0.1:{port}", bodies, levels, args.seconds, args.warmup
            )
        finally:
            server.terminate()
            server.wait()
            script.unlink()

    import ray
    from ray import serve

    from raykit.serve import build_app

    # A Ray instance of its own: never join another cluster running on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    cfg = ServeConfig(model=model, max_len=args.max_len, port=port, min_replicas=args.replicas,
                      max_replicas=args.replicas, cpus_per_replica=2 / args.replicas,
                      max_batch_size=args.max_batch_size, max_batch_tokens=65536,
                      chunk_tokens=args.chunk_tokens, batch_wait_timeout_s=0.02,
                      max_ongoing_requests=32, max_queued_requests=64,
                      access_log=False)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    rows += bench("raykit", url, bodies, levels, args.seconds, args.warmup)
    overload = asyncio.run(run_load(url, bodies, 64, args.seconds, args.warmup))
    overload = {"server": "raykit", **overload}
    overload["non_429_errors"] = sum(
        v for k, v in overload["status_counts"].items() if k not in ("200", "429")
    )
    print(json.dumps({"overload_2x": overload}), flush=True)
    info = httpx.get(url + "/info").json()["replica_stats"]
    serve.shutdown()
    ray.shutdown()

    results["rows"] = rows
    results["overload_2x_saturating"] = overload
    results["raykit_replica_stats"] = info
    by = {(r["server"], r["clients"]): r for r in rows}
    if ("naive", 32) in by:
        results["docs_per_s_ratio_at_32"] = round(
            by[("raykit", 32)]["documents_per_s"] / by[("naive", 32)]["documents_per_s"], 2
        )
    r32 = by[("raykit", 32)]
    results["raykit_p99_over_p50_at_32"] = round(r32["p99_ms"] / r32["p50_ms"], 2)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "serve_cqa.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()

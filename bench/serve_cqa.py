"""Benchmark: `raykit serve` vs a naive FastAPI + transformers server under concurrent load.

Requests carry 20 CQA dev comments (two dev groups' candidates) for the first group's query, the
Cohere /v1/rerank shape. Each server runs the same model (all-MiniLM-L6-v2 + new head) on this
machine's CPUs; the load generator (asyncio + httpx) runs 1, 8 and 32 concurrent clients for a
fixed time each, then 2x the saturating load against raykit to count non-429 errors.

naive: one uvicorn process, an `async def` route that runs the model inline (one request at a
  time, no batching), the request's 20 documents padded to the longest, 2 torch threads.
raykit: `raykit serve` on its defaults (Ray Serve, an ingress + model replicas that compile their
  model, one token-budgeted queue of pairs per replica); raykit-eager: the same, --compile off.
  Measuring starts once `raykit serve` prints "ready in" (every replica compiled). The defaults
  autoscale (1 replica, up to the node's cores under load), so throughput at a fixed replica
  count, the figure to compare across sessions, is raykit-2x1's (2 replicas x 1 thread).

Run: python bench/serve_cqa.py [--rounds 2 --seconds 60 --warmup 15]
(writes bench/results/serve_cqa.json)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    url: str,
    bodies: list[dict],
    clients: int,
    seconds: float,
    warmup: float = 0,
    route: str = "/v1/rerank",
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
                reply = await session.post(url + route, json=body)
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


def wait_healthy(url: str, timeout: float = 300, poll_s: float = 1.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{url} did not become healthy")


def bench(
    name: str,
    url: str,
    bodies: list[dict],
    levels: list[int],
    seconds: float,
    warmup: float,
    route: str,
) -> list:
    asyncio.run(run_load(url, bodies, 2, 5, route=route))  # first requests: lazy imports
    rows = []
    for clients in levels:
        figures = asyncio.run(run_load(url, bodies, clients, seconds, warmup, route))
        row = {"server": name, **figures}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def start_server(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_logged(log: Path, text: str, timeout: float = 600, poll_s: float = 0.5) -> None:
    """Wait for `text` in a server's output: `raykit serve` prints "ready in" once every
    replica is up (its /health answers as soon as one is)."""
    deadline = time.time() + timeout
    while text not in log.read_text():
        if time.time() > deadline:
            raise TimeoutError(f"no {text!r} in {log}")
        time.sleep(poll_s)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (raykit serve shuts Serve and its Ray instance down), then SIGKILL the group."""
    import signal

    server.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cqa"))
    parser.add_argument(
        "--model",
        default=str(ROOT / "output/minilm-sample"),
        help="a one-logit cross-encoder (default: the quickstart's output)",
    )
    parser.add_argument("--seconds", type=float, default=60, help="measured window per level")
    parser.add_argument("--warmup", type=float, default=15, help="unmeasured ramp-up per level")
    parser.add_argument(
        "--infinity",
        default=str(ROOT.parent / "peers/bin/infinity_emb"),
        help="infinity_emb of the peers' venv (skipped when missing)",
    )
    parser.add_argument(
        "--servers",
        default="infinity,raykit,raykit-bf16",
        help="comma-separated: infinity, raykit, raykit-bf16 (the defaults), "
        "raykit-eager[-bf16] (--compile off), raykit-1x2[-bf16], "
        "raykit-2x1[-bf16] (replicas x threads), naive",
    )
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the servers this many times in turn: this machine's speed "
        "drifts by 10-20%% within minutes, so ratios are taken within a round "
        "and the median round is reported",
    )
    args = parser.parse_args()
    from raykit.core.loading import resolve_model_path
    from raykit.core.precision import cpu_description, cpu_has_native

    model = resolve_model_path(args.model)
    bodies = requests_from(Path(args.data) / "dev.jsonl")
    levels = [int(n) for n in args.levels.split(",")]
    results: dict = {
        "args": vars(args),
        "requests": len(bodies),
        "documents_per_request": 20,
        "cpus": os.cpu_count(),
        "cpu": cpu_description(),
    }
    print(json.dumps({"cpu": results["cpu"], "cpus": results["cpus"]}), flush=True)
    raykit_cli = [sys.executable, "-m", "raykit.cli", "serve", "--model", model]
    one_by_two = ["--min_replicas", "1", "--max_replicas", "1", "--cpus_per_replica", "2"]
    two_by_one = ["--min_replicas", "2", "--max_replicas", "2", "--cpus_per_replica", "1"]
    commands = {
        "raykit": (raykit_cli, "/v1/rerank"),
        "raykit-bf16": ([*raykit_cli, "--dtype", "bfloat16"], "/v1/rerank"),
        "raykit-eager": ([*raykit_cli, "--compile", "off"], "/v1/rerank"),
        "raykit-eager-bf16": (
            [*raykit_cli, "--compile", "off", "--dtype", "bfloat16"],
            "/v1/rerank",
        ),
        "raykit-1x2": ([*raykit_cli, *one_by_two], "/v1/rerank"),
        "raykit-1x2-bf16": ([*raykit_cli, *one_by_two, "--dtype", "bfloat16"], "/v1/rerank"),
        "raykit-2x1": ([*raykit_cli, *two_by_one], "/v1/rerank"),
        "raykit-2x1-bf16": ([*raykit_cli, *two_by_one, "--dtype", "bfloat16"], "/v1/rerank"),
        "infinity": (
            [args.infinity, "v2", "--model-id", model, "--engine", "torch", "--device", "cpu"],
            "/rerank",
        ),
    }
    rows = []
    servers = args.servers.split(",")
    for round_no, name in ((r, n) for r in range(args.rounds) for n in servers):
        port = free_port()
        if name == "naive":
            script = Path("/tmp") / f"raykit_naive_server_{port}.py"
            script.write_text(NAIVE_SERVER)
            command, route = [sys.executable, str(script), model, "512", str(port)], "/v1/rerank"
        elif name == "infinity" and not os.path.exists(args.infinity):
            print(f"skipping infinity: {args.infinity} not found", flush=True)
            continue
        elif name.endswith("-bf16") and not cpu_has_native("bfloat16"):
            print(f"skipping {name}: no native bf16 on {cpu_description()}", flush=True)
            continue
        else:
            command, route = commands[name]
            command = [*command, "--port", str(port)]
        started = time.perf_counter()
        log = Path("/tmp") / f"raykit_bench_{name}_{port}.log"
        server = start_server(command, log, {"TOKENIZERS_PARALLELISM": "false"})
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url)
            if name.startswith("raykit"):
                wait_logged(log, "ready in")
            ready = time.perf_counter() - started
            print(json.dumps({"server": name, "ready_s": round(ready, 1)}), flush=True)
            rows += [
                {**row, "round": round_no}
                for row in bench(name, url, bodies, levels, args.seconds, args.warmup, route)
            ]
            if name.startswith("raykit"):
                results[f"{name}_info"] = httpx.get(url + "/info").json()
        finally:
            stop_server(server)

    results["rows"] = rows
    by = {(r["server"], r["clients"], r["round"]): r for r in rows}
    rounds = range(args.rounds)
    summary = {}
    for name in sorted({r["server"] for r in rows}):
        for clients in levels:
            docs = [by[(name, clients, r)]["documents_per_s"] for r in rounds]
            summary[f"{name}_docs_per_s_at_{clients}"] = docs
            if name != "infinity" and ("infinity", clients, 0) in by:
                ratios = [
                    d / by[("infinity", clients, r)]["documents_per_s"]
                    for d, r in zip(docs, rounds, strict=True)
                ]
                summary[f"{name}_over_infinity_at_{clients}"] = [round(x, 2) for x in ratios]
                summary[f"{name}_over_infinity_at_{clients}_median"] = round(
                    float(np.median(ratios)), 2
                )
        if (name, 32, 0) in by:
            summary[f"{name}_p99_over_p50_at_32"] = [
                round(by[(name, 32, r)]["p99_ms"] / by[(name, 32, r)]["p50_ms"], 2) for r in rounds
            ]
    results["summary"] = summary
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "serve_cqa.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

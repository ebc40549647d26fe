"""Benchmark: how soon `raykit serve` answers, first start (replicas compile) against a start
with the compiled package on disk; Infinity's start beside them when its venv is there.

Each start is timed from launch to `/health` 200 with every replica ready ("ready in"), Ray's
own start included, with one replica's split (load, compile or restore, warm-up) from /info.
The compiled-package folder is a fresh temporary one, so the first start compiles.

Run: python bench/serve_cold_start.py [--starts 2]  (writes bench/results/serve_cold_start.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.serve_cqa import (  # noqa: E402
    free_port,
    start_server,
    stop_server,
    wait_healthy,
    wait_logged,
)


def one_start(command: list[str], env: dict, name: str, logged: str | None) -> dict:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"raykit_cold_{name}_{port}.log"
    started = time.perf_counter()
    server = start_server([*command, "--port", str(port)], log, env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, poll_s=0.1)  # polled often: a start is timed to a tenth of a second
        if logged:
            wait_logged(log, logged, poll_s=0.1)
        ready = time.perf_counter() - started
        startup = None
        if logged:  # one request, so a broken replica cannot pass as ready
            body = {"query": "what is ray?", "documents": ["a fruit", "a compute engine"]}
            assert httpx.post(url + "/v1/rerank", json=body, timeout=60).status_code == 200
            startup = httpx.get(url + "/info", timeout=60).json()["replica_stats"]["startup"]
    finally:
        stop_server(server)
    return {"server": name, "ready_s": round(ready, 1), "a_replica": startup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "output/minilm-sample"))
    parser.add_argument("--starts", type=int, default=2, help="raykit starts on one cache")
    parser.add_argument("--infinity", default=str(ROOT.parent / "peers/bin/infinity_emb"))
    args = parser.parse_args()
    from raykit.core.precision import cpu_description

    print(f"CPU: {cpu_description()}", flush=True)
    cache = tempfile.mkdtemp(prefix="raykit-cold-start-")
    env = {"TOKENIZERS_PARALLELISM": "false", "RAYKIT_CACHE": cache}
    raykit = [sys.executable, "-m", "raykit.cli", "serve", "--model", args.model]
    rows = []
    for start in range(args.starts):
        for name, extra in (("raykit", []), ("raykit-no-cache", ["--compile_cache", "off"])):
            if name == "raykit-no-cache" and start > 0:
                continue
            row = one_start([*raykit, *extra], env, f"{name}-{start}", "ready in")
            row["start"] = start
            print(json.dumps(row), flush=True)
            rows.append(row)
    if Path(args.infinity).exists():
        command = [args.infinity, "v2", "--model-id", args.model, "--engine", "torch",
                   "--device", "cpu"]  # fmt: skip
        row = one_start(command, env, "infinity", None)
        print(json.dumps(row), flush=True)
        rows.append(row)
    else:
        print(f"skipping infinity: {args.infinity} not found", flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "serve_cold_start.json").write_text(
        json.dumps({"cpu": cpu_description(), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()

"""Benchmark: `raykit serve` under a load ramp, autoscaling 1 -> 2 replicas and back, against
a fixed 2-replica server; and a rollout A -> B under steady load.

The model is all-MiniLM-L6-v2 + head (the quickstart's output), requests are 20 CQA dev
comments each (bench/serve_cqa.py's), every server runs on this machine's CPUs.

ramp: `raykit serve --min_replicas 1 --max_replicas 2` (1 CPU each); 1 client for --calm s,
  --clients clients for --busy s, then none for --idle s. Every 5 s: replicas (from /info),
  docs/s, p50/p99, 429s and other errors. Reported: when the second replica started serving
  after the load step, docs/s after scale-up against the fixed server's, when it went back.
fixed: `--min_replicas 2 --max_replicas 2` at --clients clients (the anchor for docs/s).
models: two models (the same weights twice) under --clients clients, half the requests to
  each: one app serving both (`--model a=M --model b=M'`, the request's `model` picks) against
  two one-model apps on the same Serve instance (routes / and /b), 1 replica x 1 CPU per model.
rollout: a fixed 2-replica server, --clients clients; after --busy/2 s `raykit serve
  --rollout --model B` (B: the same weights copied, so the revision differs); docs/s before,
  during and after, failed requests, and which revision answered.

Both with --compile off by default (--compile auto: every new replica compiles first).
Run: python bench/serve_autoscale.py  (writes bench/results/serve_autoscale.json)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.serve_cqa import (  # noqa: E402
    DOCS_PER_REQUEST,
    free_port,
    requests_from,
    start_server,
    stop_server,
    wait_healthy,
    wait_logged,
)

TICK_S = 5.0


class Load:
    """Closed-loop clients whose number can change while it runs; every request is logged."""

    def __init__(self, url: str, bodies: list[dict]):
        self.url, self.bodies = url, bodies
        self.done: list[tuple[float, float, int, str]] = []  # (start, end, status, revision)
        self.tasks: list[asyncio.Task] = []

    async def client(self, session: httpx.AsyncClient, k: int) -> None:
        i = k
        while True:
            started = time.perf_counter()
            body = self.bodies[i % len(self.bodies)]
            path = body.get("path", "/v1/rerank")
            try:
                reply = await session.post(self.url + path, json=body.get("json", body))
                code = reply.status_code
            except httpx.HTTPError:
                code = -1
            self.done.append((started, time.perf_counter(), code, ""))
            i += 7

    def set_clients(self, session: httpx.AsyncClient, n: int) -> None:
        while len(self.tasks) < n:
            self.tasks.append(asyncio.create_task(self.client(session, len(self.tasks))))
        while len(self.tasks) > n:
            self.tasks.pop().cancel()

    def window(self, start: float, end: float) -> dict:
        rows = [r for r in self.done if start <= r[1] < end]
        ok = [e - s for s, e, c, _ in rows if c == 200]
        lat = np.array(ok or [float("nan")]) * 1000
        return {
            "docs_per_s": round(len(ok) * DOCS_PER_REQUEST / (end - start), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "429": sum(c == 429 for _, _, c, _ in rows),
            "errors": sum(c not in (200, 429) for _, _, c, _ in rows),
        }


async def replicas(session: httpx.AsyncClient, url: str) -> tuple[int, str]:
    info = (await session.get(url + "/info", timeout=30)).json()
    return info["replicas"], info["revision"]


async def ramp(url: str, bodies: list[dict], phases: list[tuple[int, float]]) -> list[dict]:
    """Run `phases` of (clients, seconds); one row per 5 s tick."""
    load, rows = Load(url, bodies), []
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=300, limits=limits) as session:
        t0 = time.perf_counter()
        for clients, seconds in phases:
            load.set_clients(session, clients)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                tick = time.perf_counter()
                await asyncio.sleep(TICK_S)
                count, _ = await replicas(session, url)
                row = {"t": round(tick - t0), "clients": clients, "replicas": count}
                row |= load.window(tick, time.perf_counter())
                print(json.dumps(row), flush=True)
                rows.append(row)
        load.set_clients(session, 0)
    return rows


async def steady(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    load = Load(url, bodies)
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=300, limits=limits) as session:
        load.set_clients(session, clients)
        await asyncio.sleep(10)  # warm-up
        start = time.perf_counter()
        await asyncio.sleep(seconds)
        figures = load.window(start, time.perf_counter())
        load.set_clients(session, 0)
    return figures


async def rollout(
    url: str, bodies: list[dict], clients: int, seconds: float, command: list[str]
) -> dict:
    """`clients` clients throughout; `command` (the rollout) starts after a third of it."""
    load = Load(url, bodies)
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=300, limits=limits) as session:
        load.set_clients(session, clients)
        await asyncio.sleep(10)
        t0 = time.perf_counter()
        _, before_rev = await replicas(session, url)
        await asyncio.sleep(seconds / 3)
        switch_start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*command)
        await proc.wait()
        switch_end = time.perf_counter()
        _, after_rev = await replicas(session, url)
        await asyncio.sleep(seconds / 3)
        end = time.perf_counter()
        load.set_clients(session, 0)
    return {
        "rollout_rc": proc.returncode,
        "rollout_s": round(switch_end - switch_start, 1),
        "revisions": [before_rev, after_rev],
        "before": load.window(t0, switch_start),
        "during": load.window(switch_start, switch_end),
        "after": load.window(switch_end, end),
        "failed_requests": sum(c != 200 for _, _, c, _ in load.done),
        "requests": len(load.done),
    }


def serve(model: str, extra: list[str], name: str) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"raykit_autoscale_{name}_{port}.log"
    command = [sys.executable, "-m", "raykit.cli", "serve", "--model", model, "--port", str(port)]
    started = time.perf_counter()
    server = start_server([*command, *extra], log, {"TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    wait_logged(log, "ready in")
    return server, url, time.perf_counter() - started


def summarise_ramp(rows: list[dict], calm: float, fixed_docs: float) -> dict:
    step = next(r["t"] for r in rows if r["clients"] > 1)
    two = next((r["t"] + TICK_S for r in rows if r["t"] >= step and r["replicas"] >= 2), None)
    busy = [r for r in rows if r["clients"] > 1 and r["replicas"] >= 2]
    back = next((r["t"] for r in rows if r["clients"] == 0 and r["replicas"] <= 1), None)
    docs = float(np.median([r["docs_per_s"] for r in busy[1:]])) if len(busy) > 1 else 0.0
    return {
        "second_replica_after_s": None if two is None else round(two - step, 1),
        "docs_per_s_scaled_up": docs,
        "over_fixed_two": round(docs / fixed_docs, 2) if fixed_docs else None,
        "back_to_one_after_idle_s": None
        if back is None
        else back - next(r["t"] for r in rows if r["clients"] == 0),
        "failed_requests": sum(r["errors"] + r["429"] for r in rows),
    }


def two_models(args: argparse.Namespace, bodies: list[dict], common: list[str]) -> dict:
    """docs/s of one app serving a and b against two one-model apps, mixed traffic."""
    copy = Path(tempfile.mkdtemp()) / "model-b"
    shutil.copytree(args.model, copy)
    one = ["--min_replicas", "1", "--max_replicas", "1", *common]
    figures = {}
    try:
        both = ["--model", f"b={copy}", *one]
        server, url, _ = serve(f"a={args.model}", both, "both")
        try:
            mixed = [{**b, "model": "ab"[i % 2]} for i, b in enumerate(bodies)]
            figures["one_app_two_models"] = asyncio.run(steady(url, mixed, args.clients, 40))
        finally:
            stop_server(server)
        server, url, _ = serve(args.model, one, "app-a")
        try:
            second = [
                sys.executable, "-m", "raykit.cli", "serve", "--model", str(copy), *one,
                "--app_name", "b", "--route_prefix", "/b", "--detach",
            ]  # fmt: skip
            # Joins the first server's instance (a command's own local instance is not joined
            # unless asked: raykit serve --detach refuses to start one that would die with it).
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": "auto"}
            subprocess.run(second, check=True, env=env)
            split = [{"json": b, "path": "/v1/rerank" if i % 2 else "/b/v1/rerank"}
                     for i, b in enumerate(bodies)]  # fmt: skip
            figures["two_one_model_apps"] = asyncio.run(steady(url, split, args.clients, 40))
        finally:
            stop_server(server)
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
    figures["ratio"] = round(
        figures["one_app_two_models"]["docs_per_s"] / figures["two_one_model_apps"]["docs_per_s"], 2
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cqa"))
    parser.add_argument("--model", default=str(ROOT / "output/minilm-sample"))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--calm", type=float, default=20)
    parser.add_argument("--busy", type=float, default=60)
    parser.add_argument("--idle", type=float, default=45)
    parser.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    parser.add_argument("--parts", default="fixed,ramp,models,rollout")
    args = parser.parse_args()
    from raykit.core.precision import cpu_description

    bodies = requests_from(Path(args.data) / "dev.jsonl")
    common = ["--cpus_per_replica", "1", "--compile", args.compile, "--access_log", "false"]
    results: dict = {"cpu": cpu_description(), "args": vars(args)}
    print(f"CPU: {cpu_description()}", flush=True)
    parts = args.parts.split(",")
    fixed_docs = 0.0
    if "fixed" in parts:
        two = ["--min_replicas", "2", "--max_replicas", "2", *common]
        server, url, ready = serve(args.model, two, "fixed")
        try:
            fixed = asyncio.run(steady(url, bodies, args.clients, args.busy / 2))
        finally:
            stop_server(server)
        fixed_docs = fixed["docs_per_s"]
        results["fixed_two"] = {"ready_s": round(ready, 1), **fixed}
        print(json.dumps({"fixed_two": results["fixed_two"]}), flush=True)
    if "ramp" in parts:
        elastic = [
            *("--min_replicas", "1", "--max_replicas", "2", "--upscale_delay_s", "3"),
            *("--downscale_delay_s", "15", "--target_ongoing_requests", "4", *common),
        ]
        server, url, ready = serve(args.model, elastic, "ramp")
        try:
            phases = [(1, args.calm), (args.clients, args.busy), (0, args.idle)]
            rows = asyncio.run(ramp(url, bodies, phases))
        finally:
            stop_server(server)
        results["ramp"] = {"ready_s": round(ready, 1), "rows": rows}
        results["ramp_summary"] = summarise_ramp(rows, args.calm, fixed_docs)
        print(json.dumps({"ramp_summary": results["ramp_summary"]}), flush=True)
    if "models" in parts:
        results["models"] = two_models(args, bodies, common)
        print(json.dumps({"models": results["models"]}), flush=True)
    if "rollout" in parts:
        two = ["--min_replicas", "2", "--max_replicas", "2", *common]
        server, url, ready = serve(args.model, two, "rollout")
        copy = Path(tempfile.mkdtemp()) / "model-b"
        shutil.copytree(args.model, copy)
        (copy / "rollout-marker.txt").write_text("B")  # same weights, another revision
        port = url.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "raykit.cli", "serve", "--rollout", "--model", str(copy)]
        try:
            figures = asyncio.run(rollout(url, bodies, args.clients, args.busy, command))
        finally:
            stop_server(server)
            shutil.rmtree(copy.parent, ignore_errors=True)
        steady_docs = figures["before"]["docs_per_s"]
        figures["during_over_steady"] = round(figures["during"]["docs_per_s"] / steady_docs, 2)
        results["rollout"] = {"port": port, **figures}
        print(json.dumps({"rollout": results["rollout"]}), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "serve_autoscale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

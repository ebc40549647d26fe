"""Benchmark (agreement, not speed): does an exported raykit model score the same where users
take it? One exported cross-encoder, the same pairs (CQA dev, or the sample data), scored by:

- raykit's `Reranker` (raw fp32 scores): the reference;
- sentence-transformers' `CrossEncoder` (this venv): `predict` gives sigmoid(score), as the
  export's config.json says; compared with sigmoid of the reference;
- FlagEmbedding's `FlagReranker` 1.4.2 (the peers' venv, `--peers_python`, never CI): raw
  `compute_score` at the export's max_length;
- `raykit serve`'s TEI route `/rerank` with `raw_scores: true` (Infinity/TEI-style raw scores).

Prints the largest absolute difference of each against the reference (target: 1e-5 at fp32),
with the CPU. Pairs are kept within the query limit (sentence-transformers and FlagReranker cut
only the pair as a whole).

Run: python bench/export_agreement.py [--model output/minilm-sample]
     [--peers_python ../peers/bin/python] [--pairs 400]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

FLAG_SCRIPT = """
import json, sys
from FlagEmbedding import FlagReranker
pairs, path, max_length = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
model = FlagReranker(path, use_fp16=False, devices=["cpu"])
print(json.dumps(model.compute_score(pairs, max_length=max_length, batch_size=32)))
"""


def cpu_line() -> str:
    model, flags = platform.processor() or "?", ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model in ("?", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
    native = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(native)}"


def load_pairs(n: int, tokenizer, query_limit: int) -> list[list[str]]:
    """(query, passage) pairs of CQA dev (else the sample dev data), queries within the limit."""
    cqa = ROOT.parent / "shared" / "data" / "cqa" / "dev.jsonl"
    source = cqa if cqa.is_file() else ROOT / "examples" / "data" / "dev.jsonl"
    pairs = []
    for line in source.open():
        row = json.loads(line)
        if len(tokenizer(row["query"], add_special_tokens=False)["input_ids"]) > query_limit:
            continue
        pairs += [[row["query"], p] for p in row["pos"] + row["neg"]]
        if len(pairs) >= n:
            break
    return pairs[:n]


def serve_raw_scores(model: str, pairs: list[list[str]], compile_mode: str) -> list[float]:
    """Raw scores from `raykit serve`'s TEI route, one request per query."""
    import httpx

    port = 8765
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(
        [sys.executable, "-m", "raykit.cli", "serve", "--model", model, "--port", str(port)]
        + ["--compile", compile_mode],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        scores = [0.0] * len(pairs)
        by_query: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            by_query.setdefault(q, []).append(i)
        for query, index in by_query.items():
            body = {"query": query, "texts": [pairs[i][1] for i in index], "raw_scores": True}
            for result in httpx.post(url + "/rerank", json=body, timeout=60).json():
                scores[index[result["index"]]] = result["score"]
        return scores
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "output" / "minilm-sample"))
    parser.add_argument("--peers_python", default=str(ROOT.parent / "peers" / "bin" / "python"))
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--skip_serve", action="store_true")
    args = parser.parse_args()
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer

    from raykit import Reranker
    from raykit.core.activation import sigmoid_array
    from raykit.core.spec import read_spec

    spec = read_spec(args.model)
    if spec is None or spec.template is not None:
        raise SystemExit(f"{args.model}: not an encoder exported by raykit (no spec)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pairs = load_pairs(args.pairs, tokenizer, spec.query_max_len or spec.max_len // 2)
    print(f"CPU: {cpu_line()}\nmodel: {args.model} (max_len {spec.max_len}), {len(pairs)} pairs")
    reference = np.array(Reranker(args.model, device="cpu").compute_score(pairs))
    results: dict[str, float | str] = {}
    predicted = CrossEncoder(args.model, device="cpu").predict(pairs, batch_size=32)
    results["sentence-transformers CrossEncoder (sigmoid)"] = float(
        np.abs(predicted - sigmoid_array(reference)).max()
    )
    if Path(args.peers_python).exists():
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(pairs, f)
        out = subprocess.run(
            [args.peers_python, "-c", FLAG_SCRIPT, f.name, args.model, str(spec.max_len)],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0:
            flag = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
            results["FlagEmbedding FlagReranker 1.4.2 (raw)"] = float(
                np.abs(flag - reference).max()
            )
        else:
            results["FlagEmbedding FlagReranker 1.4.2 (raw)"] = f"failed: {out.stderr[-300:]}"
    else:
        results["FlagEmbedding FlagReranker 1.4.2 (raw)"] = f"skipped: no {args.peers_python}"
    if not args.skip_serve:
        served = np.array(serve_raw_scores(args.model, pairs, args.compile))
        results[f"raykit serve /rerank raw_scores (compile {args.compile})"] = float(
            np.abs(served - reference).max()
        )
    for name, value in results.items():
        shown = f"max |diff| {value:.2e}" if isinstance(value, float) else value
        print(f"{name:55s} {shown}")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "export_agreement.json").write_text(
        json.dumps({"cpu": cpu_line(), "pairs": len(pairs), "max_abs_diff": results}, indent=2)
    )


if __name__ == "__main__":
    main()

"""Benchmark: the most raykit's training step can gain over FlagEmbedding's on the CQA recipe,
measured without Ray (issue 29's "2x FlagEmbedding's training speed").

Plain `torch.distributed` DDP (gloo, 2 processes x 1 thread, like both trainers in
`bench/flagembedding_cqa.py`) runs the same micro-batches of CQA groups (2 groups of 8 pairs per
process, FlagEmbedding's token cuts: query 64, passage 144, pair 160) two ways, side by side:
- "padded": every pair padded to 160 tokens in one forward, as FlagEmbedding's collator does;
- "chunked": pairs sorted by length into chunks padded to their own longest, as raykit does
  (`raykit.core.batching.make_chunks`).
Each step is forward, group softmax loss, backward (gradients all-reduced), clipping and fused
AdamW, fp32 and bf16 autocast. The chunked/padded ratio is the ceiling of raykit's training
speed over FlagEmbedding's at equal tokens with the same eager model: what a trainer loses to
Ray's processes, data iteration and uneven per-worker work (chunked steps differ in length, and
DDP waits for the slower worker) comes on top of it.

Run: python bench/train_ceiling.py [--steps 30]   (about 3 minutes on 2 cores)
The CQA data is research-only: it is read from ../shared, never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUPS, GROUP_SIZE, PAIR, QUERY, PASSAGE = 2, 8, 160, 64, 144
WARMUP_STEPS = 3


def micro_batches(tokenizer, rows: list[dict], rank: int, world: int, steps: int) -> list:
    """This rank's encodings for `steps` steps: groups sampled as raykit's training does."""
    import numpy as np

    from raykit.core.prompts import tokenize_for
    from raykit.data.groups import sample_group

    rng = np.random.default_rng(rank)
    batches = []
    for step in range(steps):
        start = (step * world + rank) * GROUPS
        groups = [sample_group(r, GROUP_SIZE, rng) for r in rows[start : start + GROUPS]]
        queries = [g.query for g in groups for _ in g.passages]
        passages = [p for g in groups for p in g.passages]
        batches.append(tokenize_for(tokenizer, None, queries, passages, PAIR, QUERY, PASSAGE))
    return batches


def worker(args: argparse.Namespace) -> None:
    """One DDP process: times both ways in both precisions; rank 0 prints a JSON line each."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raykit.core.batching import make_chunks, pad_encodings
    from raykit.core.loading import resolve_model_path
    from raykit.core.losses import group_softmax_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    path = resolve_model_path("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(path)
    lines = (Path(args.data) / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    batches = micro_batches(tokenizer, rows, rank, world, args.steps + WARMUP_STEPS)
    pad_id = tokenizer.pad_token_id

    class Chunks(torch.nn.Module):
        """The model over a list of chunks, logits back in the pairs' order."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, chunks: list[dict], order: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.model(**c).logits.float() for c in chunks]).view(-1)[order]

    def padded(encodings: list) -> tuple[list[dict], torch.Tensor]:
        batch = pad_encodings(encodings, pad_id)
        extra = PAIR - batch["input_ids"].shape[1]
        batch = {
            k: torch.nn.functional.pad(v, (0, extra), value=pad_id if k == "input_ids" else 0)
            for k, v in batch.items()
        }
        return [batch], torch.arange(len(encodings))

    def chunked(encodings: list) -> tuple[list[dict], torch.Tensor]:
        chunks, order, _ = make_chunks(encodings, 4096, pad_id, torch.device("cpu"))
        return chunks, order

    for dtype in (None, torch.bfloat16):
        for name, collate in (("padded", padded), ("chunked", chunked)):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
            model.train()
            ddp = torch.nn.parallel.DistributedDataParallel(Chunks(model))
            optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, fused=True)
            for index, encodings in enumerate(batches):
                if index == WARMUP_STEPS:
                    dist.barrier()
                    started = time.perf_counter()
                chunks, order = collate(encodings)
                with torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
                    logits = ddp(chunks, order)
                group_softmax_loss(logits, GROUP_SIZE).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            seconds = time.perf_counter() - started
            pairs = args.steps * world * GROUPS * GROUP_SIZE
            if rank == 0:
                row = {"precision": str(dtype or "float32").replace("torch.", "")}
                row |= {"batching": name, "pairs_per_s": round(pairs / seconds, 2)}
                print(json.dumps(row), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cqa"))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per way")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from raykit.core.precision import cpu_description

    print(f"CPU: {cpu_description()}, {os.cpu_count()} cores", flush=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [str(torchrun), "--nproc_per_node", "2", __file__, "--worker"]
    argv += ["--data", args.data, "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    rate = {(r["precision"], r["batching"]): r["pairs_per_s"] for r in rows}
    print("| precision | padded (FlagEmbedding's) pairs/s | chunked (raykit's) pairs/s | ratio |")
    print("| --- | --- | --- | --- |")
    for precision in ("float32", "bfloat16"):
        padded, chunked = rate[(precision, "padded")], rate[(precision, "chunked")]
        print(f"| {precision} | {padded} | {chunked} | {chunked / padded:.2f}x |")


if __name__ == "__main__":
    main()

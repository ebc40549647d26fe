"""Shared fixtures: one small Ray cluster per test session and a tiny random BERT reranker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.tiny_model import ROOT, build_tiny_reranker

SAMPLE_TRAIN = ROOT / "examples" / "data" / "train.jsonl"
SAMPLE_DEV = ROOT / "examples" / "data" / "dev.jsonl"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # slow starts under load


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs it (4 logical CPUs on 2 cores)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never another cluster on this machine.
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=1_500_000_000,
            include_dashboard=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer random BERT with one output logit and a WordPiece tokenizer trained here."""
    return build_tiny_reranker(tmp_path_factory.mktemp("tiny-bert"))


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as they are)."""
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path

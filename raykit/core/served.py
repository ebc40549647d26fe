"""Which models a server serves: `--model PATH` or `--model NAME=PATH` (repeated), and the
revision (a content hash) that `/info` and the rollout report. No Ray import."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from raykit.errors import ConfigError
from raykit.runtime.storage import is_uri

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASHED_BYTES = 1 << 16  # of each file: enough to tell checkpoints apart, cheap on a big one


@dataclass(frozen=True)
class ServedModel:
    """One model behind the endpoint: the name clients send as `model`, and where it lives."""

    name: str
    path: str

    @property
    def deployment(self) -> str:
        """Its Serve deployment: one per model, each with its own replicas and queue."""
        return f"reranker_model_{re.sub(r'[^A-Za-z0-9_-]', '_', self.name)}"


def public_model_name(model: str) -> str:
    """What clients see as the model: a hub id as it is, the last part of a path or URI (never
    a server's local path)."""
    if (
        is_uri(model)
        or os.path.isabs(model)
        or model.startswith((".", "~"))
        or os.path.isdir(model)
    ):
        return os.path.basename(model.rstrip("/")) or "reranker"
    return model


def parse_models(specs: list[str], model_name: str | None = None) -> list[ServedModel]:
    """`PATH` or `NAME=PATH` items, in order (the first is the default model). A lone PATH is
    named `model_name` or by `public_model_name`; names must be unique."""
    if not specs:
        raise ConfigError("model: at least one is required")
    served = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not _NAME.fullmatch(name) or not path:
            if sep and "/" not in name and not is_uri(spec):
                raise ConfigError(f"model: {spec!r} is not NAME=PATH (NAME: letters, digits, ._-)")
            name, path = "", spec
        if not name:
            name = model_name if model_name and len(specs) == 1 else public_model_name(path)
        served.append(ServedModel(name, path))
    names = [m.name for m in served]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"model: the name {duplicate!r} is given twice; use NAME=PATH")
    return served


def model_revision(local_dir: str) -> str:
    """12 hex digits that change when the checkpoint does: every file's name and size and the
    first 64 KiB of its bytes (a safetensors header holds every tensor's offsets)."""
    return folder_digest(local_dir, _HASHED_BYTES)[:12]


def folder_digest(local_dir: str, bytes_per_file: int | None = None) -> str:
    """sha256 of every file's relative name, size and bytes (the first `bytes_per_file` of
    them, or all) under `local_dir`, in a fixed order."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(f"{os.path.relpath(path, local_dir)}\0{os.path.getsize(path)}\0".encode())
            with open(path, "rb") as f:
                if bytes_per_file is not None:
                    digest.update(f.read(bytes_per_file))
                    continue
                while block := f.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()

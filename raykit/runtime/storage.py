"""Local paths and URIs (s3://, gs://, ... through pyarrow) for every command: one place that
resolves a path, checks an output folder before any cluster work, and publishes a finished folder
atomically, so a crash never leaves a half-written model where a loader would find it."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection

import pyarrow.fs as pafs

from raykit.errors import ConfigError


def node_cache_dir(name: str) -> str:
    """A folder on this node's own disk that outlives runs: $RAYKIT_CACHE/NAME, else
    ~/.cache/raykit/NAME."""
    root = os.environ.get("RAYKIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "raykit"
    )
    return os.path.join(root, name)


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A URI unchanged, a local path made absolute (`~` expanded)."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI and the path within it."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def join(root: str, *names: str) -> str:
    """`os.path.join` for local paths, '/'-joined for URIs."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *names])
    return os.path.join(root, *names)


def check_model_folder(name: str, field: str = "model") -> None:
    """A model name that can only be a local folder (absolute, ./ or ~, or more parts than a
    hub id's org/name) must be one: one line, without loading anything."""
    if is_uri(name) or os.path.isdir(os.path.expanduser(name)):
        return
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        raise ConfigError(
            f"{field}: {name!r} is neither a local folder nor a model id for the Hugging Face "
            "hub (no such folder)"
        )


def prepare_output_dir(
    path: str, overwrite: bool, field: str = "output_dir", keep: Collection[str] = ()
) -> None:
    """Fail in one line, before anything runs, when `path` cannot take a new output.

    It must be a folder (or not exist yet) under a writable parent, and be empty, apart from the
    names in `keep` (e.g. a sweep's own state), unless `overwrite`: the new output then replaces
    it as a whole, so no stale weights or notes stay beside the new model.
    """
    flag = "--overwrite_output_dir"
    if is_uri(path):
        fs, fs_path = filesystem(path)
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.File:
            raise ConfigError(f"{field}: {path} is a file, not a folder")
        if info.type == pafs.FileType.Directory and not overwrite:
            entries = fs.get_file_info(pafs.FileSelector(fs_path))
            if any(os.path.basename(e.path) not in keep for e in entries):
                raise ConfigError(f"{field}: {path} is not empty; pass {flag} to replace it")
        return
    path = absolute(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{field}: {path} exists and is not a folder")
        if not overwrite and set(os.listdir(path)) - set(keep):
            raise ConfigError(f"{field}: {path} is not empty; pass {flag} to replace it")
    check_writable(path, field)


def check_writable(path: str, field: str) -> None:
    """ConfigError unless the local folder `path` exists or can be created (URIs pass)."""
    if is_uri(path):
        return
    path = absolute(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{field}: {path} exists and is not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{field}: cannot create {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: cannot write to {path}: {parent} is not writable")


def publish_dir(path: str, write: Callable[[str], None]) -> None:
    """Create the folder `path` by calling `write(folder)` on a fresh folder, then put it in place.

    Locally the folder is written beside `path` and renamed into place (replacing an existing
    one), so readers see the old folder or the whole new one. On object stores, where there is no
    rename, `path` is cleared first and `config.json` is uploaded last: a Hugging Face loader
    never finds a config whose weights are still on their way.
    """
    if not is_uri(path):
        path = absolute(path)
        parent, base = os.path.split(path.rstrip(os.sep))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{base}.partial-")
        try:
            write(staging)
            os.chmod(staging, 0o755)
            old = None
            if os.path.exists(path):
                old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
                os.rename(path, old)
            os.rename(staging, path)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as staging:
        write(staging)
        fs, root = filesystem(path)
        if fs.get_file_info(root).type == pafs.FileType.Directory:
            fs.delete_dir_contents(root)
        fs.create_dir(root, recursive=True)
        names = sorted(os.listdir(staging), key=lambda name: name == "config.json")
        for name in names:
            pafs.copy_files(
                os.path.join(staging, name), f"{root}/{name}", destination_filesystem=fs
            )

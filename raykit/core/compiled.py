"""Compiled encoders kept on disk, so only the first replica of a checkpoint compiles.

`torch.compile` with inductor's freezing recompiles on every start (its FX-graph cache skips
graphs with frozen constants): ~30-45 s per replica on CPU. Instead the scoring function of an
encoder (input ids -> one logit per pair) is exported with a dynamic batch and sequence length
and compiled ahead of time by AOTInductor into one `.pt2` package. Loading a package takes a
fraction of a second. A package is keyed by what its kernels depend on: the checkpoint's
content, torch's version, the precision, the device, the CPU's instruction set (a kernel
built for AVX-512 would crash an AVX2 machine) and thread count, and the input names and
length bound.

Measured on a 2-core Zen 4 (MiniLM-L6, 1 thread, 20-document CQA requests): compiling 18 s
(torch.compile: 29 s), restoring 1.4 s; 35.5 pairs/s, as torch.compile's 35.4 (eager 31.4);
bf16 58.3 against 58.0. Inductor freezes weights (and prepacks them for mkldnn) only when it
compiles without grad, so the package is compiled under `torch.no_grad()`: without that it
ran plain addmm GEMMs, 7% slower. On an AVX2-only CPU it is the other way round (`freezes`).

A package that does not load, or whose scores on a few check pairs differ from the eager
model's, is ignored with one log line and built again: never trusted. Once a package has
passed that check, its receipt (`<package>.receipt.json`: the eager model's scores on the check
pairs) is kept beside it, and the key holds a digest of every byte of the checkpoint's folder;
so a later process restores it without loading the model at all (`restore_kept`): checked
against the receipt instead of against a model it would have to import and load (on an AVX2
EPYC that was 4 of a Serve replica's 6 s start). A package whose scores differ from its receipt
is ignored (one log line) and the model is loaded and checked as before.

A model on remote storage (s3://, gs://, ...) also shares its packages with every node there:
beside the model's folder, in `<model>.raykit-compiled/` (`shared_package_dir`), outside the
folder replicas copy the model from, so neither the copy nor the revision sees them. A node
without the package fetches it from there (checked as above) instead of compiling; the node
that compiles it puts it there. Unreadable or unwritable shared storage costs one log line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from unittest import mock

from raykit.core.head import head_scores
from raykit.runtime.logs import logger
from raykit.runtime.storage import node_cache_dir

if TYPE_CHECKING:
    import torch

MAX_BATCH = 1 << 16  # the exported batch dimension's bound (chunks are far smaller)
# How far a package's scores may be from the eager model's on the check pairs.
TOLERANCE = {"float32": 1e-4}
DEFAULT_TOLERANCE = 5e-2  # bf16/fp16: a different summation order moves the last bits


def default_cache_dir() -> str:
    """Each node's own disk: $RAYKIT_CACHE/compiled, else ~/.cache/raykit/compiled."""
    return node_cache_dir("compiled")


SHARED_SUFFIX = ".raykit-compiled"


def shared_package_dir(model_uri: str) -> str:
    """`s3://b/models/m` -> `s3://b/models/m.raykit-compiled`: a sibling of the model's folder
    (the model's copy lists `models/m/`, which does not match it)."""
    return model_uri.rstrip("/") + SHARED_SUFFIX


def package_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def content_digest(local_dir: str) -> str:
    """A digest of every byte of the checkpoint folder: a package is only ever restored for
    the very checkpoint it was built from (the revision reads only the first 64 KiB of each
    file, which a fine-tune with frozen embeddings may leave unchanged)."""
    from raykit.core.served import folder_digest

    return folder_digest(local_dir)


def key_parts(
    content: str, precision: str, device: torch.device, inputs: list[str], max_len: int
) -> dict[str, Any]:
    """What a package's kernels depend on; its file name is their hash. `content`: the
    checkpoint folder's `content_digest`."""
    import torch

    return {
        "content": content,
        "torch": torch.__version__,
        "precision": precision,
        "device": device.type,
        "isa": torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else
        torch.cuda.get_device_name(device),
        # Inductor's CPU kernels are built for the thread count at compile time.
        "threads": torch.get_num_threads() if device.type == "cpu" else 0,
        "inputs": inputs,
        "max_len": max_len,
        "frozen": freezes(device.type),
        "format": 3,  # 3: keyed by content; 2: by revision; 1: never frozen
    }  # fmt: skip


INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what an encoder's tokenizer gives


class _Scorer:
    """The encoder's scoring function as a module that `torch.export` can take."""

    @staticmethod
    def build(model: Any) -> torch.nn.Module:
        import torch

        class Scorer(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(
                self,
                input_ids: torch.Tensor,
                attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None,
            ) -> torch.Tensor:
                batch = {"input_ids": input_ids, "attention_mask": attention_mask}
                if token_type_ids is not None:
                    batch["token_type_ids"] = token_type_ids
                return head_scores(self.model, batch)

        return Scorer().eval()


def build_package(model: Any, sample: dict[str, torch.Tensor], max_len: int, path: str) -> None:
    """Export `model`'s scoring with a dynamic batch and length and compile it to `path`
    (written beside it and renamed into place, so a reader never sees half a package)."""
    import torch

    unknown = sorted(set(sample) - set(INPUTS))
    if unknown:
        raise ValueError(f"inputs {unknown} are not an encoder's")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    length = torch.export.Dim("length", min=2, max=max(3, max_len))
    shapes = {name: {0: batch, 1: length} if name in sample else None for name in INPUTS}
    with torch.inference_mode():
        program = torch.export.export(
            _Scorer.build(model), (), dict(sample), dynamic_shapes=shapes, strict=False
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".pt2", dir=os.path.dirname(path))
    os.close(fd)
    try:
        with torch.no_grad():  # inductor freezes (and prepacks) weights only without grad
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=partial,
                inductor_configs={"freezing": freezes(next(iter(sample.values())).device.type)},
            )
        os.chmod(partial, 0o644)  # mkstemp makes it private; other users may run replicas
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def freezes(device_type: str) -> bool:
    """Whether a package is compiled with its weights as constants (mkldnn-prepacked GEMMs,
    fused epilogues): on GPUs, and on CPUs with AVX-512, where it measured 7% faster than
    plain GEMMs. On an AVX2-only EPYC the prepacked fp32 GEMMs ran 20% slower than eager (19.8
    against 24.3 pairs/s, one thread), plain ones as fast or faster (25.3-27.8). The key holds
    the device and instruction set, so each kind of machine keeps its own."""
    import torch

    if device_type != "cpu":
        return True
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def load_package(path: str, device_type: str) -> Callable:
    """`aoti_load_package`, leaving no unpacked copy behind on CPU. The loader unpacks a
    package into `$TMPDIR/aotinductor_*` and removes it only in its destructor, which a
    killed Ray worker or Serve replica never runs: 89 MB left in /tmp per replica start of a
    MiniLM. A CPU package is one shared library, mapped once loaded, so its copy is unpacked
    into a folder of ours and removed at once. A GPU package may load kernel files later, so
    it is left to torch."""
    import torch

    if device_type != "cpu":
        return torch._inductor.aoti_load_package(path)
    # Python caches its temporary folder on first use: settled here, before TMPDIR points at
    # the folder removed below, or it would stay this process's for good (and every later
    # temporary file would fail once the folder is gone).
    tempfile.gettempdir()
    with (
        tempfile.TemporaryDirectory(prefix=".unpacked-", dir=os.path.dirname(path)) as unpacked,
        mock.patch.dict(os.environ, {"TMPDIR": unpacked}),  # read by the C++ loader
    ):
        return _load_cpu_package(path)


def _load_cpu_package(path: str) -> Callable:
    """A CPU package loaded by torch's C++ loader itself, called with the keyword inputs it was
    exported with. `aoti_load_package` does the same after importing inductor and building
    inductor's CPU probe (~2 s of a replica's 6 s start on an AVX2 EPYC), which only compare
    the package's CPU with this one: the package key holds the instruction set already."""
    import torch
    from torch.utils import _pytree as pytree

    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    except AttributeError:  # another torch: the public loader
        return torch._inductor.aoti_load_package(path)
    in_spec, out_spec = (pytree.treespec_loads(spec) for spec in loader.get_call_spec())
    names = list(in_spec.child(1).context)  # ((), {name: tensor}) as exported

    def run(**inputs: torch.Tensor) -> Any:
        if set(inputs) != set(names):
            raise TypeError(f"the package takes {names}, got {sorted(inputs)}")
        return pytree.tree_unflatten(loader.boxed_run([inputs[n] for n in names]), out_spec)

    return run


def checked_package(
    path: str,
    expected: list[torch.Tensor],
    checks: list[dict],
    precision: str,
    device_type: str,
    whose: str = "the model's",
) -> tuple[Callable | None, str]:
    """The loaded package at `path` if it scores `checks` as `expected` (the eager model's
    scores, `whose`), else (None, why)."""
    import torch

    try:
        loaded = load_package(path, device_type)
        with torch.inference_mode():
            for batch, want in zip(checks, expected, strict=True):
                got = loaded(**batch).float().cpu()
                gap = float((want - got).abs().max()) if got.shape == want.shape else float("inf")
                if not gap <= TOLERANCE.get(precision, DEFAULT_TOLERANCE):
                    return None, f"its scores differ from {whose} by {gap:.2g}"
    except Exception as exc:  # a truncated, foreign or corrupt file: rebuilt, never trusted
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        return None, f"it does not load ({type(exc).__name__}: {first})"
    return loaded, ""


def eager_scores(model: Any, checks: list[dict]) -> list[torch.Tensor]:
    """The eager model's float32 scores of each check batch, on the CPU."""
    import torch

    with torch.inference_mode():
        return [head_scores(model, batch).float().cpu() for batch in checks]


def receipt_path(path: str) -> str:
    return f"{path}.receipt.json"


def write_receipt(path: str, expected: list[torch.Tensor]) -> None:
    """Keep, beside the package at `path` that has just passed the check, the scores it was
    checked against (written whole by a rename)."""
    receipt = receipt_path(path)
    partial = f"{receipt}.{os.getpid()}.part"
    with open(partial, "w") as f:
        json.dump({"scores": [t.tolist() for t in expected]}, f)
    os.replace(partial, receipt)


def restore_kept(
    key: dict[str, Any], checks: list[dict], cache_dir: str, precision: str
) -> tuple[Callable | None, dict[str, float]]:
    """The package kept in `cache_dir` for `key`, checked against its receipt instead of the
    eager model, so no model is loaded: (None, {}) when there is no package with a receipt,
    or when it does not score as its receipt says (one log line)."""
    import torch

    path = os.path.join(cache_dir, f"{package_key(key)}.pt2")
    started = time.perf_counter()
    try:
        with open(receipt_path(path)) as f:
            expected = [torch.tensor(s, dtype=torch.float32) for s in json.load(f)["scores"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}  # none yet (or unreadable): the model is loaded and checked instead
    if not os.path.exists(path):
        return None, {}
    loaded, why = checked_package(
        path, expected, checks, precision, key["device"], whose="its receipt's"
    )
    if loaded is None:
        logger.warning(f"compiled model {path} not restored without the model: {why}")
        return None, {}
    return _call(loaded), {"restore_s": time.perf_counter() - started}


def load_or_build(
    model: Any,
    key: dict[str, Any],
    checks: list[dict],
    cache_dir: str,
    precision: str,
    shared_dir: str | None = None,
    build: bool = True,
) -> tuple[Callable | None, dict[str, float]]:
    """The compiled scoring function of `model` (batch -> scores) and how it was had:
    {"restore_s": ...} from the node's cache, {"fetch_s": ...} from `shared_dir` (a URI), or
    {"compile_s": ...} after building the package (then put in `shared_dir` too). Without
    `build`, only a kept package is used: (None, {}) when there is none that scores right."""

    name = f"{package_key(key)}.pt2"
    path = os.path.join(cache_dir, name)
    shared = f"{shared_dir}/{name}" if shared_dir else None
    started = time.perf_counter()
    expected: list[torch.Tensor] = []  # the eager scores, once a package is there to check

    def checked() -> tuple[Callable | None, str]:
        expected[:] = expected or eager_scores(model, checks)
        loaded, why = checked_package(path, expected, checks, precision, key["device"])
        if loaded is not None:
            write_receipt(path, expected)  # so the next process needs no model to check it
        return loaded, why

    os.makedirs(cache_dir, exist_ok=True)
    # Replicas starting together on a node: one compiles, the others wait and restore.
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(path):
                loaded, why = checked()
                if loaded is not None:
                    return _call(loaded), {"restore_s": time.perf_counter() - started}
                logger.warning(f"compiled model {path} ignored: {why}; compiling again")
            if shared and fetch_shared(shared, path):
                loaded, why = checked()
                if loaded is not None:
                    return _call(loaded), {"fetch_s": time.perf_counter() - started}
                logger.warning(f"compiled model {shared} ignored: {why}; compiling again")
            if not build:
                return None, {}
            started = time.perf_counter()
            build_package(model, checks[-1], key["max_len"], path)
            loaded, why = checked()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if loaded is None:
        raise RuntimeError(f"the package just compiled is wrong: {why}")
    split = {"compile_s": time.perf_counter() - started}
    if shared:
        publish_shared(path, shared)
    return _call(loaded), split


def fetch_shared(uri: str, path: str) -> bool:
    """Copy the package at `uri` to `path` (whole, by a rename); False when there is none or
    it cannot be read (one log line)."""
    import pyarrow.fs as pafs

    from raykit.runtime.storage import filesystem

    partial = f"{path}.{os.getpid()}.part"
    try:
        fs, remote = filesystem(uri)
        if fs.get_file_info(remote).type != pafs.FileType.File:
            return False
        with fs.open_input_stream(remote) as source, open(partial, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        os.replace(partial, path)
        return True
    except OSError as exc:
        logger.warning(f"shared compiled model {uri} not read: {exc}; compiling here")
        return False
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def publish_shared(path: str, uri: str) -> None:
    """Put the package just compiled where the model's other nodes look (an object store
    writes an object whole); failing to is one log line, as the package works here anyway."""
    from raykit.runtime.storage import filesystem

    try:
        fs, remote = filesystem(uri)
        fs.create_dir(remote.rsplit("/", 1)[0], recursive=True)
        with open(path, "rb") as source, fs.open_output_stream(remote) as target:
            shutil.copyfileobj(source, target, 1 << 20)
        logger.info(f"compiled model shared at {uri}")
    except OSError as exc:
        logger.warning(f"compiled model not shared at {uri}: {exc}")


def _call(loaded: Callable) -> Callable[[dict], torch.Tensor]:
    return lambda batch: loaded(**batch)

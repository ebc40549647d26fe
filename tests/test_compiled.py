"""Compiled encoders kept on disk: the first engine compiles a package, the next restores it,
scores equal eager's, and a corrupt or mismatched package is ignored and built again."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from raykit.core import compiled
from raykit.core.engine import InferenceEngine
from tests.helpers import build_tiny_reranker

PAIRS = [("what do cats like", "cats like to sleep " * k) for k in range(1, 12)]


def package_code(package) -> str:
    """The C++ wrapper AOTInductor generated, as stored in the package."""
    with zipfile.ZipFile(package) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("wrapper.cpp")]
        return archive.read(name).decode()


def built_as(package: bytes):
    """A stand-in for `compiled.build_package` that writes `package` (a known-good build)."""
    return lambda *args: Path(args[-1]).write_bytes(package)


def engine(model: str, **options) -> InferenceEngine:
    return InferenceEngine.load(
        model, device="cpu", dtype="float32", threads=1, max_len=64, **options
    )


RESTORE = """
import json, sys, tempfile
from raykit.core.engine import InferenceEngine
e = InferenceEngine.load(sys.argv[1], device="cpu", dtype="float32", threads=1, max_len=64,
                         compiled_cache=sys.argv[2])
print(json.dumps({
    "model_is_none": e.model is None,
    "split": sorted(e.compile_split),
    "scores": e.score_pairs(json.loads(sys.argv[3])).tolist(),
    "modeling": sorted(m for m in sys.modules if m == "transformers.modeling_utils" or (
        m.startswith("transformers.models.") and ".modeling_" in m and ".auto." not in m)),
    "tmp": tempfile.gettempdir(),
}))
"""


def restore_in_new_process(model: str, cache: Path) -> dict:
    """`InferenceEngine.load(compiled_cache=cache)` in a fresh Python, as a replica does."""
    command = [sys.executable, "-c", RESTORE, model, str(cache), json.dumps(PAIRS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_package_is_built_once_restored_after_and_never_trusted_when_wrong(
    tiny_model_dir, tmp_path, caplog, monkeypatch
):
    eager = np.array(engine(tiny_model_dir).score_pairs(PAIRS))
    cache = tmp_path / "compiled"
    scratch = tmp_path / "scratch"  # where torch's loader unpacks a package
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))

    first = engine(tiny_model_dir)
    assert first.compile_model(str(cache)) and first.scorer is not None
    assert "compile_s" in first.compile_split
    (package,) = cache.glob("*.pt2")
    np.testing.assert_allclose(first.score_pairs(PAIRS), eager, atol=1e-5)
    # Frozen weights where the CPU has AVX-512: every linear layer is a prepacked mkldnn GEMM,
    # none a plain addmm (an unfrozen package ran 7% slower than torch.compile there); plain
    # GEMMs on an AVX2-only CPU, where the prepacked ones ran 20% slower than eager.
    wrapper = package_code(package)
    frozen = ("_linear_pointwise" in wrapper, "aoti_torch_cpu_addmm" in wrapper)
    assert frozen == ((True, False) if compiled.freezes("cpu") else (False, True))

    second = engine(tiny_model_dir)
    assert second.compile_model(str(cache)) and "restore_s" in second.compile_split
    np.testing.assert_allclose(second.score_pairs(PAIRS), eager, atol=1e-5)
    assert first.stats.forward_passes == second.stats.forward_passes  # warm-up not counted
    # Loaded packages leave no unpacked copy (a killed replica would leave it for good).
    assert not list(scratch.iterdir()) and not list(cache.glob(".unpacked-*"))
    assert os.environ["TMPDIR"] == str(scratch)

    # A new process (a replica, a scoring actor) restores it without the model: checked against
    # the receipt the first check left, no model class imported, and its temporary folder
    # stays the real one (pointing TMPDIR at the unpacked copy must not stick).
    assert json.loads(Path(f"{package}.receipt.json").read_text())["scores"]
    fresh = restore_in_new_process(tiny_model_dir, cache)
    assert fresh["model_is_none"] and fresh["split"] == ["restore_s", "warm_up_s"]
    assert fresh["modeling"] == [] and fresh["tmp"] == str(scratch)
    np.testing.assert_allclose(fresh["scores"], eager, atol=1e-5)
    assert not list(scratch.iterdir())

    # A receipt the package does not match: not restored without the model (one warning);
    # the model is loaded and checks it instead, and the receipt is written again.
    receipt = Path(f"{package}.receipt.json")
    right = receipt.read_text()
    wrong = [[score + 1 for score in batch] for batch in json.loads(right)["scores"]]
    receipt.write_text(json.dumps({"scores": wrong}))
    with caplog.at_level(logging.WARNING, logger="raykit"):
        checked = engine(tiny_model_dir, compiled_cache=str(cache))
    assert "not restored without the model: its scores differ from its receipt's" in caplog.text
    assert checked.model is not None and not checked.compiled
    assert checked.compile_model(str(cache)) and "restore_s" in checked.compile_split
    assert json.loads(receipt.read_text()) == json.loads(right)
    caplog.clear()

    # Restore only (`raykit score --compile auto`): a kept package is used, none is built.
    kept = engine(tiny_model_dir)
    assert kept.compile_model(str(cache), build=False) and "restore_s" in kept.compile_split
    empty = engine(tiny_model_dir)
    assert not empty.compile_model(str(tmp_path / "empty"), build=False)
    assert empty.scorer is None and not list((tmp_path / "empty").glob("*.pt2"))
    np.testing.assert_allclose(empty.score_pairs(PAIRS), eager, atol=1e-5)

    # Corrupt: it does not load, so it is built again (one warning), scores still right. The
    # build is the good package's bytes (compiling was shown above; this is about the check).
    good = package.read_bytes()
    package.write_bytes(good[:1000])
    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, logger="raykit"):
        patched.setattr(compiled, "build_package", built_as(good))
        corrupt = engine(tiny_model_dir)
        assert corrupt.compile_model(str(cache))
    assert "compile_s" in corrupt.compile_split and package.read_bytes() == good
    assert any("ignored: it does not load" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(corrupt.score_pairs(PAIRS), eager, atol=1e-5)

    # Mismatched: a package under this model's key that loads but is another model's (as if
    # the key collided) is compiled again.
    other = build_tiny_reranker(tmp_path / "other", seed=1)
    other_eager = np.array(engine(other).score_pairs(PAIRS))
    other_cache = tmp_path / "other-compiled"
    other_cache.mkdir()
    monkeypatch.setattr(compiled, "package_key", lambda parts: "collided")
    shutil.copy(package, other_cache / "collided.pt2")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raykit"):
        mismatched = engine(other)
        assert mismatched.compile_model(str(other_cache))
    assert any("its scores differ" in r.getMessage() for r in caplog.records)
    assert "compile_s" in mismatched.compile_split
    np.testing.assert_allclose(mismatched.score_pairs(PAIRS), other_eager, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_model_on_remote_storage_shares_its_package_with_other_nodes(
    tiny_model_dir, tmp_path, caplog, monkeypatch
):
    """A file:// URI stands for s3:// (tests/test_cluster.py does it on an S3 API). The engine
    that compiles puts its package beside the model's folder (not in it); an engine with
    another node's empty cache fetches it instead of compiling; a corrupt shared package is
    ignored, built again and replaced."""
    remote = tmp_path / "bucket" / "models" / "m"
    shutil.copytree(tiny_model_dir, remote)
    uri = f"file://{remote}"
    eager = np.array(engine(tiny_model_dir).score_pairs(PAIRS))

    first = engine(uri)
    assert first.compile_model(str(tmp_path / "node1")) and "compile_s" in first.compile_split
    (shared,) = (tmp_path / "bucket" / "models" / "m.raykit-compiled").glob("*.pt2")
    assert not list(remote.rglob("*.pt2"))

    second = engine(uri)
    assert second.compile_model(str(tmp_path / "node2")) and "fetch_s" in second.compile_split
    np.testing.assert_allclose(second.score_pairs(PAIRS), eager, atol=1e-5)

    # A corrupt shared package: ignored, built again (as the good package's bytes: compiling
    # was shown above) and replaced.
    good = shared.read_bytes()
    shared.write_bytes(b"not a package")
    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, logger="raykit"):
        patched.setattr(compiled, "build_package", built_as(good))
        third = engine(uri)
        assert third.compile_model(str(tmp_path / "node3"))
    assert "compile_s" in third.compile_split
    assert any(f"{shared.name} ignored: it does not load" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(third.score_pairs(PAIRS), eager, atol=1e-5)
    assert shared.read_bytes() == good  # replaced by the package just built


def test_decoders_and_int8_are_not_packaged(tiny_model_dir):
    int8 = InferenceEngine.load(tiny_model_dir, device="cpu", dtype="int8", max_len=64)
    assert not int8._can_package()
    assert engine(tiny_model_dir)._can_package()


def test_a_package_is_keyed_by_every_byte_of_the_checkpoint(tiny_model_dir, tmp_path):
    """A fine-tune can leave the first 64 KiB of every file as they were (frozen embeddings):
    the revision stays, but the package of the checkpoint it replaced is never its own."""
    from raykit.core.served import model_revision

    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) > 64 * 1024
    data[-1] ^= 1  # a bit of the last tensor
    weights.write_bytes(bytes(data))
    assert model_revision(str(changed)) == model_revision(tiny_model_dir)
    before, after = engine(tiny_model_dir), engine(str(changed))
    checks = before._warm_up_batches()
    assert before._package_key(checks) != after._package_key(checks)
    assert before._package_key(checks) == engine(tiny_model_dir)._package_key(checks)

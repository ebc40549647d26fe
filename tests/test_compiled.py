"""Compiled encoders kept on disk: the first engine compiles a package, the next restores it,
scores equal eager's, and a corrupt or mismatched package is ignored and built again."""

from __future__ import annotations

import logging
import os
import shutil
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


def engine(model: str) -> InferenceEngine:
    return InferenceEngine.load(model, device="cpu", dtype="float32", threads=1, max_len=64)


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
    # Frozen weights: every linear layer is a prepacked mkldnn GEMM, none a plain addmm (an
    # unfrozen package ran 7% slower than torch.compile).
    wrapper = package_code(package)
    assert "_linear_pointwise" in wrapper and "aoti_torch_cpu_addmm" not in wrapper

    second = engine(tiny_model_dir)
    assert second.compile_model(str(cache)) and "restore_s" in second.compile_split
    np.testing.assert_allclose(second.score_pairs(PAIRS), eager, atol=1e-5)
    assert first.stats.forward_passes == second.stats.forward_passes  # warm-up not counted
    # Loaded packages leave no unpacked copy (a killed replica would leave it for good).
    assert not list(scratch.iterdir()) and not list(cache.glob(".unpacked-*"))
    assert os.environ["TMPDIR"] == str(scratch)

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

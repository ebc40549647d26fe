"""Output folders: refused when in use, published whole or not at all."""

from __future__ import annotations

import os

import pytest

from raykit.errors import ConfigError
from raykit.runtime.storage import join, prepare_output_dir, publish_dir


def test_publish_replaces_the_folder_whole_and_a_failed_write_changes_nothing(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "pytorch_model.bin").write_text("old weights")

    def crash(folder: str) -> None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_dir(str(out), crash)
    assert os.listdir(out) == ["pytorch_model.bin"]  # the old model, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind

    def write(folder: str) -> None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{}")

    publish_dir(str(out), write)
    assert os.listdir(out) == ["config.json"]  # nothing stale beside the new model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    publish_dir(str(tmp_path / "new" / "deep"), write)  # parents are created
    assert (tmp_path / "new" / "deep" / "config.json").exists()


def test_prepare_output_dir_checks(tmp_path):
    prepare_output_dir(str(tmp_path / "fresh" / "dir"), overwrite=False)  # may be created
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "ray").mkdir()
    prepare_output_dir(str(tmp_path / "used"), overwrite=False, keep={"ray"})
    (tmp_path / "used" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite_output_dir"):
        prepare_output_dir(str(tmp_path / "used"), overwrite=False, keep={"ray"})
    prepare_output_dir(str(tmp_path / "used"), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        prepare_output_dir(str(tmp_path / "file"), overwrite=True)
    with pytest.raises(ConfigError, match="is a file"):
        prepare_output_dir(str(tmp_path / "file" / "below"), overwrite=False, field="output")
    assert join("s3://bucket/sweeps/", "run", "trials") == "s3://bucket/sweeps/run/trials"
    assert join("/tmp/a", "b") == "/tmp/a/b"

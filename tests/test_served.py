"""Which models a server serves (`--model PATH`, `NAME=PATH` repeated, a YAML mapping) and the
revision that tells checkpoints apart."""

from __future__ import annotations

import pytest

from raykit.config import ConfigError, ServeConfig, load_config
from raykit.core.served import ServedModel, model_revision, parse_models


def test_a_plain_path_keeps_working_and_names_come_from_the_folder_or_model_name(tmp_path):
    folder = tmp_path / "minilm"
    folder.mkdir()
    assert parse_models([str(folder)]) == [ServedModel("minilm", str(folder))]
    assert parse_models([str(folder)], "prod") == [ServedModel("prod", str(folder))]
    # Not a folder here: a hub id, shown as it is.
    assert parse_models(["BAAI/bge-reranker-base"])[0].name == "BAAI/bge-reranker-base"
    assert parse_models(["s3://bucket/a=b/model"])[0].path == "s3://bucket/a=b/model"


def test_several_named_models_in_order_each_its_own_deployment():
    served = parse_models(["small=out/minilm", "large=s3://bucket/bge"])
    assert [(m.name, m.path) for m in served] == [
        ("small", "out/minilm"),
        ("large", "s3://bucket/bge"),
    ]
    assert [m.deployment for m in served] == ["reranker_model_small", "reranker_model_large"]
    assert ServedModel("bge.v2", "x").deployment == "reranker_model_bge_v2"


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (["a=x", "a=y"], "model: the name 'a' is given twice; use NAME=PATH"),
        (["/srv/v1/minilm", "/srv/v2/minilm"], "model: the name 'minilm' is given twice"),
        (["my model=x"], "model: 'my model=x' is not NAME=PATH"),
        (["a="], "model: 'a=' is not NAME=PATH"),
        ([], "model: at least one is required"),
    ],
)
def test_bad_model_lists_are_one_line_errors(models, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig(model=models)


def test_yaml_takes_a_mapping_or_a_list(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model:\n  small: out/minilm\n  large: out/bge\n")
    assert load_config(ServeConfig, path).model == ["small=out/minilm", "large=out/bge"]
    path.write_text("model: out/minilm\n")
    assert load_config(ServeConfig, path).model == ["out/minilm"]


def test_revision_changes_with_the_checkpoint_and_only_then(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    first = model_revision(str(tmp_path))
    assert model_revision(str(tmp_path)) == first and len(first) == 12
    (tmp_path / "model.safetensors").write_bytes(b"\1" + b"\0" * 999)
    assert model_revision(str(tmp_path)) != first

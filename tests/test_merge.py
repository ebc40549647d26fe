"""`raykit mix`: exact weighted averages, base models without a head, mismatches, auto weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from raykit.cli import app, normalize_argv
from raykit.config import ConfigError, MixConfig
from raykit.core.losses import group_softmax_loss
from raykit.core.reranker import Reranker
from raykit.core.spec import RerankerSpec
from raykit.tools.mix import example_loss, run_mix
from tests.helpers import SAMPLE_DEV, build_tiny_reranker, plain_hf_logits, train_tiny, write_jsonl

SPEC_64 = RerankerSpec(max_len=64)


def state(path: str) -> dict[str, torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return model.state_dict()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mix")
    return build_tiny_reranker(root / "a", seed=1), build_tiny_reranker(root / "b", seed=2)


def test_mix_is_exactly_the_weighted_average(two_models, tmp_path):
    a, b = two_models
    args = ["mix", "--models", a, b, "--weights", "0.3", "0.7", "--output", str(tmp_path / "m")]
    result = CliRunner().invoke(app, normalize_argv(args))
    assert result.exit_code == 0, result.output
    mixed, sa, sb = state(str(tmp_path / "m")), state(a), state(b)
    assert set(mixed) == set(sa)
    assert all(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].dim() == 2)  # two models
    for key, tensor in mixed.items():
        torch.testing.assert_close(tensor, 0.3 * sa[key] + 0.7 * sb[key], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "m" / "mix.json").read_text())["weights"] == [0.3, 0.7]
    assert "x 0.3000" in (tmp_path / "m" / "README.md").read_text()  # the model card
    assert f"{a}=0.3000, {b}=0.7000" in result.output
    # The folder is a complete model: its scores are those of the averaged weights.
    pairs = [["what is ray", "a distributed compute engine"], ["what is ray", "a fish"]]
    scores = Reranker(str(tmp_path / "m"), device="cpu", max_length=64).compute_score(pairs)
    by_hand = AutoModelForSequenceClassification.from_pretrained(a, num_labels=1).eval()
    by_hand.load_state_dict({k: 0.3 * sa[k] + 0.7 * sb[k] for k in sa})
    expected = plain_hf_logits(by_hand, pairs, max_len=64)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scores != pytest.approx(Reranker(a, max_length=64).compute_score(pairs), abs=1e-3)


def test_base_without_head_takes_the_head_of_the_others(two_models, tmp_path, capsys):
    base = build_tiny_reranker(tmp_path / "base", seed=3, head=False)
    _, tuned = two_models
    run_mix(MixConfig(models=[base, tuned], weights=["0.5", "0.5"], output=str(tmp_path / "m")))
    mixed, sb, st = state(str(tmp_path / "m")), state(base), state(tuned)
    torch.testing.assert_close(mixed["classifier.weight"], st["classifier.weight"], rtol=0, atol=0)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(mixed[key], 0.5 * sb[key] + 0.5 * st[key], rtol=0, atol=1e-6)
    assert "classifier.weight: not in every checkpoint" in capsys.readouterr().out


def test_mismatched_architectures_name_the_first_differing_tensor(two_models, tmp_path):
    wide = build_tiny_reranker(tmp_path / "wide", hidden_size=64)
    out = str(tmp_path / "m")
    cfg = MixConfig(models=[two_models[0], wide], weights=["0.5", "0.5"], output=out)
    with pytest.raises(ConfigError, match=r"bert.embeddings.word_embeddings.weight.*\(\d+, 64\)"):
        run_mix(cfg)


@pytest.mark.parametrize(
    "weights, message",
    [
        (["0.5", "0.6"], "sum to 1"),
        (["-0.5", "1.5"], ">= 0"),
        (["1.0"], "1 weight"),
        (["auto"], "example_data"),
        (["half", "half"], "numbers or 'auto'"),
    ],
)
def test_bad_weights_fail_before_loading(weights, message):
    with pytest.raises(ConfigError, match=message):
        MixConfig(models=["x", "y"], weights=weights)


def test_auto_weights_favour_the_model_with_lower_loss(two_models, tmp_path, capsys):
    examples = [json.loads(line) for line in SAMPLE_DEV.read_text().splitlines()][:8]
    write_jsonl(tmp_path / "few.jsonl", examples)
    # "trained": model a after a few steps of group-softmax training on these examples.
    groups = [[g["query"], g["pos"][0], *g["neg"][:3]] for g in examples]
    trained = train_tiny(two_models[0], groups, tmp_path / "trained")
    untrained = two_models[1]

    cfg = MixConfig(
        models=[untrained, trained],
        weights=["auto"],
        train_group_size=4,
        example_data=[str(tmp_path / "few.jsonl")],
        max_len=64,
        temperature=0.5,
        output=str(tmp_path / "m"),
    )
    summary = run_mix(cfg)
    losses = []
    for path in (untrained, trained):
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
        losses.append(
            example_loss(m, AutoTokenizer.from_pretrained(path), examples, 4, spec=SPEC_64)
        )
    assert losses[1] < losses[0] - 0.2  # the training worked
    expected = torch.softmax(-torch.tensor(losses) / 0.5, 0).tolist()
    assert summary["weights"] == pytest.approx(expected, abs=1e-5)
    assert summary["weights"][1] > summary["weights"][0]
    assert "example losses" in capsys.readouterr().out
    # example_loss is the group-softmax loss of the first positive + up to 3 negatives.
    g = examples[0]
    logits = plain_hf_logits(m, [[g["query"], p] for p in [g["pos"][0], *g["neg"][:3]]], 64)
    single = example_loss(m, AutoTokenizer.from_pretrained(trained), [g], 4, spec=SPEC_64)
    assert single == pytest.approx(group_softmax_loss(torch.tensor(logits), 4).item(), abs=1e-5)


def test_mix_refuses_a_non_empty_output_and_replaces_it_whole_when_asked(two_models, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"stale")
    cfg = MixConfig(models=list(two_models), weights=["0.5", "0.5"], output=str(out))
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite_output_dir"):
        run_mix(cfg)
    cfg.overwrite_output_dir = True
    run_mix(cfg)
    assert not (out / "pytorch_model.bin").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind

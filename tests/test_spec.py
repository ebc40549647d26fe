"""The reranker spec: a model raykit wrote scores as it was trained with no flag repeated, an
explicit flag overrides it (and says so), a model without a trained head is refused, and the
exports score the same in sentence-transformers, plain transformers and the model card's code."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from raykit.config import EvaluateConfig, MineConfig, ScoreConfig, ServeConfig
from raykit.core.activation import sigmoid_array
from raykit.core.prompts import TEMPLATES
from raykit.core.reranker import Reranker
from raykit.core.spec import SPEC_FILE, RerankerSpec, write_spec
from raykit.errors import ConfigError
from raykit.tools.model_card import write_card
from tests.helpers import (
    SAMPLE_DEV,
    build_tiny_decoder,
    build_tiny_reranker,
    card_snippets,
    run_snippet,
    write_jsonl,
)

LONG = " ".join(["the cat sat on the mat and looked at the bird in the tree"] * 12)
PAIRS = [
    ["what do cats like", "cats like to sleep in the sun"],
    ["what do cats like", LONG],
    ["where is the river", "the river runs past the old mill near town"],
]
CUSTOM = "Judge whether the document says what cats do"


def with_spec(source: str, folder: Path, spec: RerankerSpec) -> str:
    """A copy of the model at `source` with `spec` written next to it, as raykit's exports."""
    from transformers import AutoTokenizer

    shutil.copytree(source, folder)
    write_spec(str(folder), spec, AutoTokenizer.from_pretrained(folder))
    return str(folder)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> str:
    return build_tiny_decoder(tmp_path_factory.mktemp("spec") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def trained_decoder(decoder, tmp_path_factory) -> str:
    """The decoder as if fine-tuned with --instruction CUSTOM --max_len 128."""
    template = replace(TEMPLATES["qwen3"], instruction=CUSTOM)
    spec = RerankerSpec(kind="decoder", max_len=128, template=template)
    return with_spec(decoder, tmp_path_factory.mktemp("spec") / "trained-qwen3", spec)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    """A tiny encoder as if fine-tuned with --max_len 40 --query_max_len 8."""
    source = build_tiny_reranker(tmp_path_factory.mktemp("spec") / "plain")
    spec = RerankerSpec(max_len=40, query_max_len=8)
    return with_spec(source, tmp_path_factory.mktemp("spec") / "trained-encoder", spec)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return build_tiny_reranker(tmp_path_factory.mktemp("spec") / "base", head=False)


def test_the_spec_file_says_how_the_model_scores(trained_decoder):
    saved = json.loads((Path(trained_decoder) / SPEC_FILE).read_text())
    assert saved["kind"] == "decoder" and saved["max_len"] == 128
    assert saved["activation"] == "sigmoid"
    assert saved["template"]["instruction"] == CUSTOM
    assert saved["template"]["prefix"].startswith("<|im_start|>system")  # inline, not a name
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_decoder)
    assert saved["yes_token_id"] == tokenizer.convert_tokens_to_ids("yes")
    assert saved["no_token_id"] == tokenizer.convert_tokens_to_ids("no")
    assert tokenizer.model_max_length == 128


def test_a_decoder_scores_with_its_own_prompt_and_limits(decoder, trained_decoder, capsys):
    remembered = Reranker(trained_decoder).compute_score(PAIRS)
    told = Reranker(decoder, instruction=CUSTOM, max_length=128).compute_score(PAIRS)
    assert remembered == pytest.approx(told, abs=1e-6)
    assert "overrides" not in capsys.readouterr().out  # nothing was overridden
    default = Reranker(decoder).compute_score(PAIRS)  # the default instruction and max_len
    assert not np.allclose(remembered, default, atol=1e-4)
    wrong = Reranker(trained_decoder, instruction="Find recipes").compute_score(PAIRS)
    assert not np.allclose(remembered, wrong, atol=1e-4)
    out = capsys.readouterr().out
    assert f"instruction: 'Find recipes' overrides the model's {CUSTOM!r} ({SPEC_FILE})" in out
    # Pair by pair (left padding moves a decoder's positions, as in Qwen3-Reranker's code).
    longer = Reranker(trained_decoder, max_length=512)
    cut = Reranker(trained_decoder)
    assert longer.compute_score(PAIRS[0]) == pytest.approx(cut.compute_score(PAIRS[0]), abs=1e-6)
    assert longer.compute_score(PAIRS[1]) != pytest.approx(cut.compute_score(PAIRS[1]), abs=1e-4)
    assert "max_len: 512 overrides the model's 128" in capsys.readouterr().out


def test_an_encoder_scores_with_its_own_limits(encoder):
    remembered = Reranker(encoder).compute_score(PAIRS)
    told = Reranker(encoder, max_length=40, query_max_length=8).compute_score(PAIRS)
    assert remembered == pytest.approx(told, abs=1e-6)
    longer = Reranker(encoder, max_length=512).compute_score(PAIRS)
    assert longer[1] != pytest.approx(remembered[1], abs=1e-6)


def test_a_broken_spec_or_a_swapped_tokenizer_is_a_one_line_error(trained_decoder, tmp_path):
    broken = Path(shutil.copytree(trained_decoder, tmp_path / "broken"))
    (broken / SPEC_FILE).write_text('{"kind": "decoder"}')
    with pytest.raises(ConfigError, match=rf"{broken / SPEC_FILE}: not a valid reranker spec"):
        Reranker(str(broken))
    swapped = Path(shutil.copytree(trained_decoder, tmp_path / "swapped"))
    spec = json.loads((swapped / SPEC_FILE).read_text())
    spec["yes_token_id"] += 1
    (swapped / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="yes/no token ids .* are .* in the tokenizer"):
        Reranker(str(swapped))


# ---------------------------------------------------------------------------- untrained heads


def test_a_model_without_a_trained_head_is_refused_everywhere(base, tmp_path):
    from raykit.mining.mine import run_mine
    from raykit.scoring.evaluate import run_evaluate
    from raykit.scoring.pipeline import run_score
    from raykit.serving.app import app_builder, run_serve

    rows = write_jsonl(tmp_path / "pairs.jsonl", [{"query": "q", "passage": "p"}])
    refused = f"{base}: has no trained reranker head .* --allow_untrained_head"
    with pytest.raises(ConfigError, match=refused):
        Reranker(base)
    with pytest.raises(ConfigError, match=refused):
        run_score(ScoreConfig(model=base, input=[str(rows)], output=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match=refused):
        run_serve(ServeConfig(model=base))
    with pytest.raises(ConfigError, match=refused):
        app_builder({"model": base})  # `serve run` / KubeRay configs
    with pytest.raises(ConfigError, match=refused):
        run_evaluate(EvaluateConfig(model_name_or_path=base, eval_data=[str(SAMPLE_DEV)]))
    with pytest.raises(ConfigError, match=refused):
        run_mine(MineConfig(input=[str(SAMPLE_DEV)], filter_model=base))


def test_allow_untrained_head_scores_with_a_random_head_and_says_so(base, capsys):
    from raykit.core.spec import check_reranker
    from raykit.scoring.evaluate import evaluate_model

    scores = Reranker(base, allow_untrained_head=True).compute_score(PAIRS)
    assert len(scores) == 3
    assert "no trained reranker head; classifier.bias, classifier.weight created at random" in (
        capsys.readouterr().out
    )
    cfg = EvaluateConfig(
        model_name_or_path=base, eval_data=[str(SAMPLE_DEV)], allow_untrained_head=True
    )
    assert 0 <= evaluate_model(cfg)["nDCG@10"] <= 1
    for options in (
        ScoreConfig(model=base, input=["x"], allow_untrained_head=True),
        ServeConfig(model=base, allow_untrained_head=True),
    ):
        assert check_reranker(base, options).kind == "encoder"  # the drivers' check passes


def test_finetune_creates_the_head_and_its_first_worker_says_so(
    base, tiny_model_dir, monkeypatch, capsys
):
    """The driver's check does not build the model's class for a fine-tune (seconds of
    imports); the first worker, which has loaded it, says once that the head is new."""
    import raykit.core.loading
    from raykit.config import FinetuneConfig
    from raykit.core.spec import check_reranker
    from raykit.training.recipe import FinetuneRecipe

    def not_on_the_driver(*args, **kwargs):
        raise AssertionError("missing_head called by the driver's check")

    cfg = FinetuneConfig(model_name_or_path=base, train_data=["t.jsonl"])
    with monkeypatch.context() as patch:
        patch.setattr(raykit.core.loading, "missing_head", not_on_the_driver)
        check_reranker(base, cfg, "model_name_or_path", training=True)
    assert "head" not in capsys.readouterr().out
    recipe = FinetuneRecipe.__new__(FinetuneRecipe)  # just the method under test
    said: list[str] = []
    recipe.log = said.append
    for model in (base, tiny_model_dir):
        recipe.cfg = FinetuneConfig(model_name_or_path=model, train_data=["t.jsonl"])
        recipe._say_if_head_is_new(model)
    assert said == [f"{base}: no reranker head yet; fine-tuning creates one"]


def test_the_embedded_bi_encoder_has_no_reranker_head():
    with pytest.raises(ConfigError, match="minilm-l6: has no trained reranker head"):
        Reranker("minilm-l6")


# ---------------------------------------------------------------------------- other tools


def test_sentence_transformers_cross_encoder_scores_an_export_the_same(encoder):
    from sentence_transformers import CrossEncoder
    from torch import nn

    pairs = [PAIRS[0], PAIRS[2]]  # within the query limit (sentence-transformers has none)
    raw = np.array(Reranker(encoder).compute_score(pairs))
    model = CrossEncoder(encoder, device="cpu")
    assert model.max_length == 40
    np.testing.assert_allclose(model.predict(pairs), sigmoid_array(raw), atol=1e-5)
    identity = model.predict(pairs, activation_fn=nn.Identity())
    np.testing.assert_allclose(identity, raw, atol=1e-5)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_the_model_card_snippets_run_and_agree(kind, encoder, trained_decoder):
    folder = encoder if kind == "encoder" else trained_decoder
    write_card(folder, "# a card\n\n", Path(folder).name)
    snippets = card_snippets(folder)
    card_pairs = [
        ["what is ray?", "a distributed compute engine"],
        ["what is ray?", "a fruit"],
    ]
    expected = np.array(Reranker(folder).compute_score(card_pairs))
    results = [np.array(run_snippet(code, folder)) for code in snippets]
    assert len(results) == 3
    np.testing.assert_allclose(results[0], expected, atol=1e-6)  # raykit
    np.testing.assert_allclose(results[1], expected, atol=1e-5)  # transformers
    # sentence-transformers (for a decoder: the prompt as the chat template), normalised
    np.testing.assert_allclose(results[2], sigmoid_array(expected), atol=1e-5)


def test_sentence_transformers_scores_a_decoder_export_with_its_prompt(trained_decoder):
    """CrossEncoder builds a causal LM + LogitScore(yes, no); the prompt raykit trained with
    is the export's chat template, so its scores are raykit's, pair by pair and in batches."""
    from sentence_transformers import CrossEncoder
    from torch import nn

    pairs = [PAIRS[0], PAIRS[2], ["a", "b"]]
    model = CrossEncoder(trained_decoder, device="cpu")
    raw = np.array([Reranker(trained_decoder).compute_score(p) for p in pairs])
    alone = [model.predict([p], activation_fn=nn.Identity())[0] for p in pairs]
    np.testing.assert_allclose(alone, raw, atol=1e-5)
    np.testing.assert_allclose(model.predict(pairs), sigmoid_array(raw), atol=1e-4)
    other = Reranker(trained_decoder, instruction="Find recipes").compute_score(pairs[0])
    assert abs(other - raw[0]) > 1e-4  # the chat template carries the trained instruction


# ---------------------------------------------------------------------------- serving


def replica(model: str, **options):
    """A Serve model replica, built in this process (no Serve, no compile) and given its model
    as Serve would: through `reconfigure` with the deployment's user_config."""
    import asyncio

    from raykit.serving.replica import RerankerModel

    cfg = ServeConfig(model=model, compile="off", **options)
    built = RerankerModel.func_or_class(cfg, "test")
    asyncio.run(built.reconfigure({"model": model}))
    return built


def test_tei_truncate_false_measures_the_decoder_prompt(trained_decoder):
    model = replica(trained_decoder)
    engine = model.current.engine
    assert engine.max_len == 128  # the model's own, unasked
    short = ["cats like to sleep", "the mill near town"]
    assert isinstance(model._tokenize(engine, "what do cats like", short, None, False), list)
    # Within 128 tokens as a plain (query, text) pair, over 128 as the prompt that is scored.
    text = " ".join(["cats sleep"] * 20)
    plain = len(engine.tokenizer("what do cats like", text)["input_ids"])
    scored = model._tokenize(engine, "what do cats like", [text], None, True)[0]["input_ids"]
    assert plain < 128 and len(scored) == 128
    message = model._tokenize(engine, "what do cats like", ["short", text], None, False)
    assert isinstance(message, str) and message.startswith("texts[1]: the prompt is ")
    assert "max_len 128" in message

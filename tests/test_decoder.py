"""Decoder (LLM) rerankers: tiny random Qwen3/Gemma/Llama causal LMs score exactly as an
independent implementation of the documented formulas, through `Reranker`, `raykit score` and
`evaluate`; truncation keeps the prompt suffix; full fine-tuning learns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raykit.config import ConfigError, EvaluateConfig, FinetuneConfig, ScoreConfig
from raykit.core.prompts import TEMPLATES, model_kind, resolve_template
from raykit.core.reranker import Reranker
from tests.helpers import (
    QWEN3_SUFFIX,
    SAMPLE_DEV,
    build_tiny_decoder,
    card_snippets,
    gemma_reference,
    qwen3_reference,
    run_snippet,
    sample_pairs,
    write_jsonl,
)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    families = ("qwen3", "gemma", "llama")
    return {family: build_tiny_decoder(root / family, family) for family in families}


def test_kind_comes_from_the_architecture_and_the_template_from_the_model_type():
    from transformers import BertConfig, GemmaConfig, Qwen3Config

    qwen = Qwen3Config(architectures=["Qwen3ForCausalLM"])
    assert model_kind(qwen) == "decoder" and model_kind(qwen, "encoder") == "encoder"
    assert model_kind(Qwen3Config(architectures=["Qwen3ForSequenceClassification"])) == "encoder"
    assert model_kind(BertConfig(architectures=["BertForSequenceClassification"])) == "encoder"
    assert resolve_template(qwen) == TEMPLATES["qwen3"]
    gemma = resolve_template(GemmaConfig(architectures=["GemmaForCausalLM"]), instruction="x")
    assert gemma.name == "gemma" and gemma.yes_token == "Yes" and gemma.instruction == "x"
    with pytest.raises(ConfigError, match="model_kind"):
        model_kind(qwen, "seq2seq")


def test_qwen3_scores_equal_the_model_card_formula(decoders):
    pairs = sample_pairs()
    expected, p_yes, _ = qwen3_reference(decoders["qwen3"], pairs)
    reranker = Reranker(decoders["qwen3"], device="cpu", batch_size=5)
    scores = np.array(reranker.compute_score(pairs))
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    np.testing.assert_allclose(reranker.compute_score(pairs, normalize=True), p_yes, atol=1e-5)
    assert len(set(np.round(scores, 5))) > len(pairs) // 2  # not a constant


@pytest.mark.slow  # inductor compiles for tens of seconds
def test_a_compiled_decoder_scores_like_eager(decoders):
    """torch.compile of a causal LM (left padding, `logits_to_keep=1`): the same scores."""
    from raykit.core.engine import InferenceEngine

    pairs = sample_pairs()[:24]
    engine = InferenceEngine.load(decoders["qwen3"], device="cpu", token_budget=512)
    eager = engine.score_pairs(pairs)
    assert engine.compile_model()
    np.testing.assert_allclose(engine.score_pairs(pairs), eager, atol=1e-4, rtol=0)


def test_gemma_scores_equal_the_bge_gemma_prompt(decoders):
    pairs = sample_pairs(6)
    reranker = Reranker(decoders["gemma"], device="cpu")
    np.testing.assert_allclose(
        reranker.compute_score(pairs), gemma_reference(decoders["gemma"], pairs), atol=1e-4
    )


def test_a_model_type_without_a_default_template_needs_one(decoders):
    with pytest.raises(ConfigError, match="template: no default prompt for model type 'llama'"):
        Reranker(decoders["llama"], device="cpu")
    pairs = sample_pairs(4)
    reranker = Reranker(decoders["llama"], device="cpu", template="qwen3")
    expected, _, _ = qwen3_reference(decoders["llama"], pairs)
    np.testing.assert_allclose(reranker.compute_score(pairs), expected, atol=1e-4)


def test_truncation_cuts_the_document_and_keeps_the_prompt_suffix(decoders):
    from transformers import AutoTokenizer

    long_document = " ".join(["ray serve batches requests"] * 400)
    pairs = [["what is ray", long_document], ["what is ray", "a short passage"]]
    reranker = Reranker(decoders["qwen3"], device="cpu", max_length=96)
    encodings = reranker.engine.tokenize([q for q, _ in pairs], [d for _, d in pairs])
    tokenizer = AutoTokenizer.from_pretrained(decoders["qwen3"])
    suffix = tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)
    assert len(encodings[0]["input_ids"]) == 96
    assert all(e["input_ids"][-len(suffix) :] == suffix for e in encodings)
    # ... and the score is the reference's at the same max_length.
    expected, _, _ = qwen3_reference(decoders["qwen3"], pairs, max_length=96)
    np.testing.assert_allclose(reranker.compute_score(pairs), expected, atol=1e-4)


def test_bf16_keeps_the_ranking(decoders):
    pairs = sample_pairs()
    fp32 = np.array(Reranker(decoders["qwen3"], device="cpu").compute_score(pairs))
    bf16 = np.array(
        Reranker(
            decoders["qwen3"], device="cpu", bf16=True, allow_slow_precision=True
        ).compute_score(pairs)
    )
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * max(1.0, float(np.abs(fp32).max())))


def test_instruction_and_yes_no_tokens_are_settings(decoders):
    pairs = sample_pairs(4)
    plain = np.array(Reranker(decoders["qwen3"], device="cpu").compute_score(pairs))
    instructed = Reranker(decoders["qwen3"], device="cpu", instruction="Find the answer")
    assert not np.allclose(instructed.compute_score(pairs), plain, atol=1e-4)
    flipped = Reranker(decoders["qwen3"], device="cpu", yes_token="no", no_token="yes")
    np.testing.assert_allclose(flipped.compute_score(pairs), -plain, atol=1e-5)
    with pytest.raises(ConfigError, match="yes_token"):
        Reranker(decoders["qwen3"], device="cpu", yes_token="relevant passage")


@pytest.mark.slow
def test_finetuning_a_decoder_learns_and_exports_a_causal_lm(ray_cluster, decoders, tmp_path):
    """Full fine-tuning of a tiny Qwen3 reranker on its prompts (group softmax over
    logit(yes) - logit(no)) raises NDCG@10 on marked data; the export is a causal LM that
    remembers its instruction and max_len: evaluated, scored and loaded with no flag repeated,
    it scores as the final evaluation did, and its model card's code agrees."""
    from raykit.scoring.evaluate import evaluate_model
    from raykit.training.launch import finetune
    from tests.helpers import marked_train_file

    dev = str(marked_train_file(tmp_path, SAMPLE_DEV))
    cfg = FinetuneConfig(
        model_name_or_path=decoders["qwen3"],
        train_data=[str(marked_train_file(tmp_path))],
        eval_data=[dev],
        output_dir=str(tmp_path / "out"),
        storage_path=str(tmp_path / "ray"),
        learning_rate=2e-3,
        train_group_size=4,
        per_device_train_batch_size=4,
        num_train_epochs=4,
        max_len=160,
        instruction="Judge whether the passage answers the question",
        logging_steps=5,
        eval_steps=10,
    )
    result = finetune(cfg, console=False)
    before, after = result.summary["eval_before"], result.summary["eval"][-1]
    assert after["nDCG@10"] > before["nDCG@10"] + 0.1, (before, after)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    out = str(tmp_path / "out")
    again = evaluate_model(EvaluateConfig(model_name_or_path=out, eval_data=[dev]))
    assert again["nDCG@10"] == pytest.approx(result.best_metrics["nDCG@10"], abs=1e-4)
    spec = json.loads((tmp_path / "out" / "raykit_reranker.json").read_text())
    assert spec["max_len"] == 160 and spec["template"]["instruction"] == cfg.instruction
    # The card's transformers code (the documented formula, pair by pair) agrees with raykit.
    pairs = [["what is ray?", "a distributed compute engine"], ["what is ray?", "a fruit"]]
    by_card = run_snippet(card_snippets(out)[1], out)
    by_raykit = [Reranker(out).compute_score(p) for p in pairs]
    np.testing.assert_allclose(by_card, by_raykit, atol=1e-5)
    wrong = [Reranker(out, instruction="Find recipes").compute_score(p) for p in pairs]
    assert not np.allclose(wrong, by_raykit, atol=1e-4)
    # raykit score (Ray Data tokenising tasks and actors), no flag repeated.
    from raykit.scoring.pipeline import run_score

    pairs = sample_pairs(8)
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"query": q, "passage": p} for q, p in pairs])
    scored = tmp_path / "scored"
    run_score(ScoreConfig(model=out, input=[str(source)], output=str(scored), format="jsonl"))
    rows = [json.loads(line) for line in (scored / "pairs.jsonl").open()]
    np.testing.assert_allclose(
        [r["score"] for r in rows], Reranker(out).compute_score(pairs), atol=1e-4
    )


@pytest.mark.slow
def test_score_and_evaluate_take_a_decoder(ray_cluster, decoders, tmp_path):
    from raykit.scoring.evaluate import evaluate_model
    from raykit.scoring.pipeline import run_score

    pairs = sample_pairs()
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"query": q, "passage": p} for q, p in pairs])
    run_score(
        ScoreConfig(
            model=decoders["qwen3"],
            input=[str(source)],
            output=str(tmp_path / "scored"),
            format="jsonl",
            num_actors=1,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "scored" / "pairs.jsonl").open()]
    expected, _, _ = qwen3_reference(decoders["qwen3"], pairs)
    np.testing.assert_allclose([r["score"] for r in rows], expected, atol=1e-4)

    metrics = evaluate_model(
        EvaluateConfig(model_name_or_path=decoders["qwen3"], eval_data=[str(SAMPLE_DEV)])
    )
    assert 0.0 < metrics["nDCG@10"] <= 1.0

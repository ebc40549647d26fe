"""The inference engine: scores equal a plain Hugging Face forward pass at fp32, bf16 and int8
stay within stated tolerances, precision and machine-filling defaults resolve as documented."""

import logging
import re

import numpy as np
import pytest
import torch

from raykit.config import ConfigError, FinetuneConfig, ScoreConfig, ServeConfig, load_config
from raykit.core import precision
from raykit.core.engine import InferenceEngine
from raykit.core.loading import load_model_and_tokenizer
from raykit.core.precision import describe_precision, resolve_dtype
from raykit.core.reranker import Reranker
from raykit.core.spec import RerankerSpec
from tests.helpers import SAMPLE_DEV, plain_hf_logits

QUERIES = ["how long to boil an egg", "why is the sky blue", "what is ray"]
PASSAGES = [
    "six minutes for a soft yolk",
    "eggs keep for weeks in the fridge " * 6,
    "rayleigh scattering of sunlight",
    "a",
    "ray is a framework for distributed python " * 3,
    "the sky is blue because of the ocean",
]
PAIRS = [[q, p] for q in QUERIES for p in PASSAGES]


def sample_pairs() -> list[list[str]]:
    import json

    pairs = []
    for line in SAMPLE_DEV.read_text().splitlines():
        group = json.loads(line)
        pairs += [[group["query"], p] for p in group["pos"] + group["neg"]]
    return pairs


def test_fp32_scores_equal_a_plain_forward_pass_whatever_the_chunking(tiny_model_dir):
    expected = plain_hf_logits(tiny_model_dir, PAIRS, max_len=64)
    for budget, most in ((64, 2), (256, 5), (100_000, 1000)):
        engine = InferenceEngine.load(
            tiny_model_dir,
            device="cpu",
            dtype="float32",
            max_len=64,
            token_budget=budget,
            max_batch_size=most,
        )
        scores = engine.score_pairs(PAIRS)
        np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)
        assert engine.stats.pairs == len(PAIRS)
    # Pairs of similar length share a chunk: far less padding than one padded batch.
    lengths = [len(e["input_ids"]) for e in engine.tokenize(*zip(*PAIRS, strict=True))]
    one_batch = 1 - sum(lengths) / (max(lengths) * len(lengths))
    assert 1 < engine.stats.forward_passes < len(PAIRS)
    assert engine.stats.padding_ratio < one_batch / 2
    # auto on CPU is fp32: the same scores.
    assert InferenceEngine.load(tiny_model_dir, device="cpu").precision == "float32"


def close_in_rank(reference: np.ndarray, scores: np.ndarray, tolerance: float) -> None:
    """Within `tolerance` of the reference, and in the same order wherever the reference's
    scores are further apart than twice the tolerance."""
    np.testing.assert_allclose(scores, reference, atol=tolerance, rtol=0)
    for i in range(len(reference)):
        for j in range(len(reference)):
            if reference[i] - reference[j] > 2 * tolerance:
                assert scores[i] > scores[j], (i, j)


@pytest.mark.parametrize(("dtype", "tolerance"), [("bfloat16", 0.05), ("int8", 0.1)])
def test_bf16_and_int8_stay_close_and_rank_alike(tiny_model_dir, dtype, tolerance):
    pairs = sample_pairs()
    reference = InferenceEngine.load(tiny_model_dir, device="cpu", max_len=64).score_pairs(pairs)
    engine = InferenceEngine.load(
        tiny_model_dir, device="cpu", dtype=dtype, max_len=64, allow_slow_precision=True
    )
    assert engine.precision == dtype
    if dtype == "bfloat16":  # the engine's own copy runs in bf16 weights on CPU
        assert engine.model.bert.encoder.layer[0].output.dense.weight.dtype == torch.bfloat16
        assert engine.model.classifier.weight.dtype == torch.float32
    scores = engine.score_pairs(pairs)
    if dtype == "bfloat16":  # an fp32 head: scores are not rounded to bf16, so they do not tie
        on_bf16_grid = torch.tensor(scores).bfloat16().float().numpy() == scores
        assert on_bf16_grid.mean() < 0.5
        # Nearly every pair its own score, as in fp32: a bf16 head would leave 2-3 values here.
        # (An odd tie is allowed: two pairs whose bf16 hidden states agree. The tokenizer is
        # trained anew each run, and in 2 of 6 runs bf16 gave 59 distinct scores for 60 pairs.)
        assert len(np.unique(scores)) >= len(np.unique(reference)) - 2
    assert not np.array_equal(scores, reference)  # the precision really changed
    close_in_rank(reference, scores, tolerance)


def test_a_handed_model_runs_under_autocast_and_is_not_modified(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    model.eval()
    engine = InferenceEngine(
        model,
        tokenizer,
        precision="bfloat16",
        autocast_dtype=torch.bfloat16,
        spec=RerankerSpec(max_len=64),
    )
    scores = engine.score_pairs(PAIRS)
    assert next(model.parameters()).dtype == torch.float32
    close_in_rank(np.array(plain_hf_logits(tiny_model_dir, PAIRS, 64)), scores, 0.05)


@pytest.mark.slow  # inductor compiles for tens of seconds
def test_a_compiled_model_scores_like_eager_and_compiles_only_while_warming_up(tiny_model_dir):
    """torch.compile (what Serve replicas do on CPU): fp32 scores equal the eager model's, and
    after `compile_model` no batch shape (one pair, padded or not, chunks of any size, pairs cut
    at max_len) compiles again: a request never waits for the compiler."""
    from torch._dynamo.utils import counters

    options = {"device": "cpu", "max_len": 64, "token_budget": 256, "max_batch_size": 5}
    eager = InferenceEngine.load(tiny_model_dir, **options)
    engine = InferenceEngine.load(tiny_model_dir, **options)
    assert not engine.compiled
    assert engine.compile_model() and engine.compiled
    assert engine.stats.forward_passes == 0  # the warm-up is not counted as traffic
    graphs = counters["stats"]["unique_graphs"]
    for pairs in ([PAIRS[0]], PAIRS[:2], [PAIRS[1]] * 3, PAIRS, sample_pairs()[:40]):
        np.testing.assert_allclose(
            engine.score_pairs(pairs), eager.score_pairs(pairs), atol=1e-5, rtol=0
        )
    assert counters["stats"]["unique_graphs"] == graphs
    assert engine.stats.forward_passes > 5


def test_a_failed_compile_keeps_eager_scoring(tiny_model_dir, monkeypatch, caplog):
    def compiler_missing(model, **options):
        def fails(**batch):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return fails

    engine = InferenceEngine.load(tiny_model_dir, device="cpu", max_len=64)
    expected = engine.score_pairs(PAIRS)
    monkeypatch.setattr(torch, "compile", compiler_missing)
    with caplog.at_level(logging.WARNING, logger="raykit"):
        assert engine.compile_model() is False
    assert "torch.compile failed, scoring eagerly: RuntimeError: InvalidCxxCompiler" in caplog.text
    assert not engine.compiled and engine.stats.forward_passes == 0
    np.testing.assert_allclose(engine.score_pairs(PAIRS), expected, atol=1e-6, rtol=0)


ZEN2 = {"cpu_name": "AMD EPYC 7B12", "architecture": "x86_64", "avx2": True}
ZEN4 = {**ZEN2, "cpu_name": "AMD EPYC 9B14", "avx512_f": True, "avx512_bf16": True}
GRAVITON = {"cpu_name": "Neoverse-V1", "architecture": "aarch64"}


def fake_cpu(monkeypatch, capabilities: dict) -> None:
    """This process's CPU seen as `capabilities` (torch.cpu.get_capabilities' keys)."""
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: capabilities)


def test_reranker_is_the_engine_with_aliases(tiny_model_dir, monkeypatch):
    fake_cpu(monkeypatch, ZEN4)
    reranker = Reranker(tiny_model_dir, device="cpu", max_length=64, bf16=True)
    assert reranker.engine.precision == "bfloat16"
    slow = Reranker(tiny_model_dir, device="cpu", fp16=True, allow_slow_precision=True)
    assert slow.engine.precision == "float16"
    with pytest.raises(ValueError, match="fp16/bf16"):
        Reranker(tiny_model_dir, fp16=True, bf16=True)


def test_low_precision_the_cpu_only_emulates_is_refused(tiny_model_dir, monkeypatch, caplog):
    """bf16 on an AVX2-only CPU runs ~40x slower than fp32: refused with the CPU named,
    in Python and on the command line, unless explicitly allowed."""
    fake_cpu(monkeypatch, ZEN2)
    message = (
        "dtype bfloat16: this CPU, AMD EPYC 7B12 (avx2), has no avx512_bf16 or amx_bf16, so "
        "bfloat16 runs ~40x slower than float32 here; use --dtype float32"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        Reranker(tiny_model_dir, device="cpu", bf16=True)
    with caplog.at_level(logging.WARNING, logger="raykit"):
        allowed = Reranker(tiny_model_dir, device="cpu", bf16=True, allow_slow_precision=True)
    assert allowed.engine.precision == "bfloat16" and "running it: --allow_slow_precision" in (
        caplog.text
    )
    with pytest.raises(ConfigError, match="dtype float16: .* has no avx512_fp16 or amx_fp16"):
        Reranker(tiny_model_dir, device="cpu", dtype="float16")
    # The driver's check, before Ray starts: every command that loads a model runs it.
    cfg = load_config(ScoreConfig, input=["x"], model=tiny_model_dir, dtype="bfloat16")
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.check_hardware(use_gpu=False)
    cfg.check_hardware(use_gpu=True)  # a GPU run: the CPU's bf16 does not matter
    load_config(ScoreConfig, input=["x"], bf16=True, allow_slow_precision=True).check_hardware(
        use_gpu=False
    )


def test_resolve_dtype(monkeypatch):
    fake_cpu(monkeypatch, ZEN2)
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("int8", "cpu") == "int8"
    assert resolve_dtype("bfloat16", "cuda") == "bfloat16"
    assert "no native bf16" in describe_precision("auto", "cpu")
    with pytest.raises(ConfigError, match="bfloat16"):
        resolve_dtype("bfloat16", "cpu")
    assert resolve_dtype("bfloat16", "cpu", allow_slow=True) == "bfloat16"
    fake_cpu(monkeypatch, ZEN4)
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert "--dtype bfloat16 runs faster" in describe_precision("auto", "cpu")
    with pytest.raises(ConfigError, match="float16"):
        resolve_dtype("float16", "cpu")
    fake_cpu(monkeypatch, GRAVITON)  # torch cannot tell: nothing refused
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", "cpu")


def test_dtype_option_and_its_aliases():
    assert load_config(ScoreConfig, input=["x"], bf16=True).precision == "bfloat16"
    assert load_config(ScoreConfig, input=["x"], dtype="int8").precision == "int8"
    assert load_config(ScoreConfig, input=["x"]).precision == "auto"
    with pytest.raises(ConfigError, match="dtype: float32 conflicts with --bf16"):
        load_config(ScoreConfig, input=["x"], bf16=True, dtype="float32")
    with pytest.raises(
        ConfigError, match="dtype: expected auto, float32, bfloat16, float16 or int8"
    ):
        load_config(ServeConfig, dtype="double")
    with pytest.raises(ConfigError, match="int8 is for inference only"):
        load_config(FinetuneConfig, train_data=["x"], dtype="int8")


def test_chunk_tokens_is_read_as_forward_token_budget(tmp_path, capsys):
    path = tmp_path / "serve.yaml"
    path.write_text("chunk_tokens: 2048\n")
    assert load_config(ServeConfig, path).forward_token_budget == 2048
    assert "'chunk_tokens' is now 'forward_token_budget'" in capsys.readouterr().err

"""LoRA (peft) and FSDP2 fine-tuning of a tiny Qwen3 reranker on two CPU workers: the sharded
run computes the same losses as DDP, resumes from an adapter checkpoint after a worker is
killed and reproduces them, learns, and exports an adapter whose merge scores exactly like
base + adapter under the model card's formula."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from raykit.config import ConfigError, FinetuneConfig
from raykit.core.reranker import Reranker
from tests.helpers import (
    SAMPLE_DEV,
    actor_pids,
    build_tiny_decoder,
    marked_train_file,
    qwen3_reference,
    sample_pairs,
    wait_for,
)


def lora_config(model: str, tmp_path: Path, name: str, **extra) -> FinetuneConfig:
    options = dict(
        model_name_or_path=model,
        train_data=[str(marked_train_file(tmp_path))],
        eval_data=[str(marked_train_file(tmp_path, SAMPLE_DEV))],
        output_dir=str(tmp_path / name / "out"),
        storage_path=str(tmp_path / "ray"),
        run_name=name,
        num_workers=2,
        use_lora=True,
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.1,
        learning_rate=3e-3,
        train_group_size=4,
        per_device_train_batch_size=2,
        max_len=160,
        max_steps=12,  # marked data: nDCG@10 goes from 0.65 to 1.0 within 10 steps
        logging_steps=1,
        save_steps=3,
        eval_steps=6,
    )
    return FinetuneConfig(**{**options, **extra})


def run_and_kill_a_worker(cfg: FinetuneConfig, run_dir: Path):
    """`finetune(cfg)` in a thread; once Ray Train has registered a checkpoint (its checkpoint
    manager's snapshot is written; a checkpoint folder alone may still wait in the report
    queue), one training worker is killed: Ray Train restarts the group from that checkpoint."""
    from raykit.training.launch import finetune

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = finetune(cfg, console=False)
        except BaseException as exc:  # re-raised in the test
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    wait_for(
        lambda: (run_dir / "checkpoint_manager_snapshot.json").exists() or not thread.is_alive(),
        300,
        "a registered checkpoint",
        interval=0.05,
    )
    workers = actor_pids("RayTrainWorker")
    assert thread.is_alive() and len(workers) == 2, "the run ended before a worker was killed"
    os.kill(workers[-1], signal.SIGKILL)
    thread.join(timeout=600)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@pytest.mark.slow
def test_fsdp_computes_the_losses_of_ddp_and_exports_a_plain_model(ray_cluster, tmp_path):
    """Sharded (FSDP2) and replicated (DDP) training of every weight on two workers take the
    same steps, with gradient checkpointing on the sharded side; the export is the causal LM.
    (LoRA's FSDP run is checked against DDP in the killed-worker test below.)"""
    from raykit.training.launch import finetune

    base = build_tiny_decoder(tmp_path / "qwen3", "qwen3")
    same = {
        "max_steps": 4,
        "eval_steps": 2,
        "save_steps": 2,
        "lora_dropout": 0.0,
        "use_lora": False,
        "learning_rate": 1e-3,
    }
    ddp = finetune(lora_config(base, tmp_path, "ddp", **same), console=False)
    # Recomputing activations (gradient checkpointing) must not change a step either.
    fsdp = finetune(
        lora_config(base, tmp_path, "fsdp", fsdp=True, gradient_checkpointing=True, **same),
        console=False,
    )
    expected = [e["loss"] for e in ddp.summary["loss"]]
    assert [e["loss"] for e in fsdp.summary["loss"]] == pytest.approx(expected, abs=1e-4)
    assert expected[-1] < expected[0]
    assert fsdp.best_metrics["nDCG@10"] == pytest.approx(ddp.best_metrics["nDCG@10"], abs=1e-4)
    for result in (ddp, fsdp):
        out = Path(result.output_dir)
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["Qwen3ForCausalLM"]


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(900)
def test_sharded_lora_run_resumes_after_a_killed_worker_and_exports_the_adapter(
    ray_cluster, tmp_path
):
    """An FSDP + LoRA run (with gradient checkpointing) whose worker is killed resumes from its
    adapter checkpoint (optimizer shards, every rank's RNG, data position) and takes the same
    steps as an uninterrupted DDP run (without dropout, whose masks depend on how a batch is
    chunked); it learns; its adapter export, merged, scores exactly as base + adapter, and the
    DDP run's export is the merged causal LM."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raykit.core.export import save_merged
    from raykit.training.launch import finetune

    base = build_tiny_decoder(tmp_path / "qwen3", "qwen3")
    reference = finetune(lora_config(base, tmp_path, "reference", lora_dropout=0.0), console=False)
    merged_export = Path(reference.output_dir)
    assert not (merged_export / "adapter_config.json").exists()
    config = json.loads((merged_export / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    cfg = lora_config(
        base,
        tmp_path,
        "killed",
        fsdp=True,
        gradient_checkpointing=True,
        lora_dropout=0.0,
        max_failures=1,
        save_merged_model=False,
    )
    killed = run_and_kill_a_worker(cfg, tmp_path / "ray" / "killed")

    resumed = killed.summary["resumed_from_step"]
    assert resumed > 0 and resumed % 3 == 0, "the run was meant to be interrupted"
    assert [e["step"] for e in killed.summary["loss"]] == list(range(1, 13))
    expected = [e["loss"] for e in reference.summary["loss"]]
    assert [e["loss"] for e in killed.summary["loss"]] == pytest.approx(expected, abs=1e-4)
    assert killed.best_metrics["nDCG@10"] == pytest.approx(
        reference.best_metrics["nDCG@10"], abs=1e-4
    )
    before, after = killed.summary["eval_before"], killed.summary["eval"][-1]
    assert after["nDCG@10"] > before["nDCG@10"] + 0.1, (before, after)

    # --no-save_merged_model exports the adapter, naming its base.
    adapter = Path(cfg.output_dir)
    assert (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "model.safetensors").exists()
    assert (
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    )
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "A LoRA adapter: a reranker fine-tuned with LoRA (rank 8, alpha 16)" in card.text

    # The merged model scores as base + adapter (unmerged, through peft) under the model
    # card's formula, and so does the adapter folder itself when raykit loads it.
    pairs = sample_pairs()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    # Both remember the run's max_len (their raykit_reranker.json).
    expected_scores, _, _ = qwen3_reference(base, pairs, max_length=160, model=unmerged)
    merged = tmp_path / "merged"
    save_merged(str(adapter), str(merged))
    np.testing.assert_allclose(
        Reranker(str(merged)).compute_score(pairs), expected_scores, atol=1e-4
    )
    np.testing.assert_allclose(
        Reranker(str(adapter)).compute_score(pairs), expected_scores, atol=1e-4
    )


@pytest.mark.slow
def test_lora_on_an_encoder_trains_the_new_head_and_mix_merges_the_adapter(
    ray_cluster, tiny_model_dir, tmp_path
):
    """An encoder's LoRA run also trains its (new) classification head; `mix` takes the
    adapter folder, merging it into its base first."""
    from raykit.config import MixConfig
    from raykit.tools.mix import run_mix
    from raykit.training.launch import finetune

    cfg = FinetuneConfig(
        model_name_or_path=tiny_model_dir,
        train_data=[str(marked_train_file(tmp_path))],
        output_dir=str(tmp_path / "adapter"),
        storage_path=str(tmp_path / "ray"),
        use_lora=True,
        lora_rank=8,
        lora_target_modules=["query", "value", "dense"],
        save_merged_model=False,
        lora_dropout=0.0,
        learning_rate=5e-3,
        train_group_size=4,
        max_len=64,
        max_steps=60,
        logging_steps=10,
    )
    result = finetune(cfg, console=False)
    losses = [e["loss"] for e in result.summary["loss"]]
    # ln 4 = 1.386 at the start (a new head). At lr 5e-3 the later 10-step means differ from
    # run to run (one CI run: 0.97 then 1.41, 1.36), so the check is on the second half's best.
    assert min(losses[len(losses) // 2 :]) < losses[0] - 0.3, losses
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert sorted(adapter_config["target_modules"]) == ["dense", "query", "value"]

    pairs = sample_pairs()
    tuned = Reranker(str(tmp_path / "adapter")).compute_score(pairs)
    run_mix(
        MixConfig(
            models=[str(tmp_path / "adapter"), tiny_model_dir],
            weights=["1", "0"],
            output=str(tmp_path / "mixed"),
        )
    )
    # All the weight on the adapter: the mix is the merged fine-tuned model.
    np.testing.assert_allclose(
        Reranker(str(tmp_path / "mixed")).compute_score(pairs), tuned, atol=1e-5
    )


def test_lora_settings_are_checked():
    with pytest.raises(ConfigError, match="lora_rank: must be > 0"):
        FinetuneConfig(train_data=["x"], use_lora=True, lora_rank=0)
    with pytest.raises(ConfigError, match="lora_dropout"):
        FinetuneConfig(train_data=["x"], use_lora=True, lora_dropout=1.0)
    with pytest.raises(ConfigError, match="only used with --use_lora"):
        FinetuneConfig(train_data=["x"], lora_target_modules=["q_proj"])

"""Model cards: Hugging Face's own parser reads the metadata and eval results raykit writes."""

from huggingface_hub import ModelCard

from raykit.config import FinetuneConfig, MixConfig
from raykit.tools.model_card import finetune_card, hub_id, mix_card, write_card


def card_of(text: str, tmp_path) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_text(text)
    return ModelCard.load(path)


def test_finetune_card_metadata_results_and_settings(tmp_path):
    cfg = FinetuneConfig(
        model_name_or_path="BAAI/bge-reranker-base",
        train_data=["/d/train.jsonl"],
        eval_data=["/d/dev.jsonl"],
        output_dir="/o/my-reranker",
        learning_rate=2e-5,
        metrics=["nDCG@10", "AP"],
    )
    summary = {"steps": 30, "eval_before": {"nDCG@10": 0.5, "AP": 0.4}}
    best = {"nDCG@10": 0.75, "AP": 0.625, "step": 20, "epoch": 1.0, "loss": 0.3}
    card = card_of(finetune_card(cfg, summary, best, ["training: 40 valid groups"]), tmp_path)
    data = card.data.to_dict()
    assert data["base_model"] == "BAAI/bge-reranker-base"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-ranking"
    assert "raykit" in data["tags"]
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"nDCG@10": 0.75, "AP": 0.625}  # the measures only, not step/loss
    assert card.data.eval_results[0].dataset_name == "dev.jsonl"
    text = card.text
    assert "| nDCG@10 | 0.5000 | 0.7500 |" in text and "| AP | 0.4000 | 0.6250 |" in text
    assert "learning_rate: 2.0e-05" in text  # a changed setting ...
    assert "max_len" not in text  # ... and not the defaults
    assert "training: 40 valid groups" in text
    # The usage section is written with the model (it follows the model's spec).
    write_card(str(tmp_path), finetune_card(cfg, summary, best, []), "my-reranker")
    written = (tmp_path / "README.md").read_text()
    assert "Reranker('my-reranker')" in written and "CrossEncoder('my-reranker')" in written


def test_local_models_are_not_named_as_hub_base_models(tmp_path):
    assert hub_id(str(tmp_path)) is None and hub_id("s3://bucket/model") is None
    assert hub_id("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    cfg = FinetuneConfig(model_name_or_path=str(tmp_path), train_data=["t.jsonl"], output_dir="o")
    card = card_of(finetune_card(cfg, {}, {}, []), tmp_path)
    assert "base_model" not in card.data.to_dict()
    assert card.data.eval_results is None
    assert f"`{tmp_path}`" in card.text  # still said in the text


def test_mix_card_lists_models_and_weights(tmp_path):
    cfg = MixConfig(models=["org/base", str(tmp_path)], weights=["0.3", "0.7"], output="o/mixed")
    summary = {"models": cfg.models, "weights": [0.3, 0.7], "example_losses": None}
    card = card_of(mix_card(cfg, summary), tmp_path)
    assert card.data.to_dict()["base_model"] == "org/base"
    assert "`org/base` x 0.3000" in card.text and f"`{tmp_path}` x 0.7000" in card.text

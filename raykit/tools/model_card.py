"""Model cards: a `README.md` in Hugging Face's model-card format for every model raykit exports
(`finetune`'s output_dir, `tune`'s best, `mix`'s output), so that on a hub or a shared drive a
model says what it is, what it came from, what it was trained on and how well it ranks.

The YAML metadata is huggingface_hub's `ModelCardData` (`library_name`, `base_model`,
`pipeline_tag`, `tags`, and `model-index` built from `EvalResult`s); the body has the results table,
the data summary, the settings that differ from raykit's defaults and how to load the model.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

CARD_FILE = "README.md"
EMBEDDED_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
PRIVATE_KEYS = ("api_key",)


def hub_id(model: str) -> str | None:
    """`model` as a hub id for `base_model`, or None for a local folder or a URI (the hub
    accepts only ids there)."""
    model = EMBEDDED_HUB_IDS.get(model, model)
    if "://" in model or os.path.exists(model) or model.startswith((".", "/", "~")):
        return None
    return model if re.fullmatch(r"[\w.-]+/[\w.-]+", model) else None


def changed_settings(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass that differ from their defaults (secrets left out)."""
    changed = {}
    for f in dataclasses.fields(config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = getattr(config, f.name)
        if value != default and f.name not in PRIVATE_KEYS:
            changed[f.name] = value.item() if hasattr(value, "item") else value  # numpy scalars
    return changed


def metric_type(name: str) -> str:
    """A model-index metric type: nDCG@10 -> ndcg_at_10."""
    return re.sub(r"[^a-z0-9_]", "_", name.lower().replace("@", "_at_"))


def results_table(columns: Mapping[str, Mapping[str, float] | None]) -> str:
    """Markdown table: a row per measure, a column per evaluation (e.g. before / after)."""
    columns = {name: values for name, values in columns.items() if values}
    measures = list(
        dict.fromkeys(
            m for values in columns.values() for m in values if isinstance(values[m], (int, float))
        )
    )
    if not measures:
        return "No evaluation data was given.\n"
    lines = ["| measure | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for measure in measures:
        cells = [f"{v[measure]:.4f}" if measure in v else "" for v in columns.values()]
        lines.append(f"| {measure} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def usage(name: str) -> str:
    return f"""```python
from raykit import Reranker

reranker = Reranker("{name}")
reranker.rerank("what is ray?", ["a fruit", "a distributed compute engine"])
# A decoder (causal LM) reranker scores logit("yes") - logit("no") at the last token of its
# prompt; Reranker builds the prompt (see raykit.core.prompts) and merges a LoRA adapter folder.

# transformers, for a one-logit encoder: the score is the logit of a sequence classifier
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForSequenceClassification.from_pretrained("{name}").eval()
batch = tokenizer([["what is ray?", "a distributed compute engine"]], return_tensors="pt")
score = model(**batch).logits[0, 0]

# sentence-transformers
from sentence_transformers import CrossEncoder

CrossEncoder("{name}").predict([("what is ray?", "a distributed compute engine")])
```
"""


def render_card(
    *,
    name: str,
    summary_line: str,
    base_models: Sequence[str],
    results: Mapping[str, Mapping[str, float] | None],
    final: Mapping[str, float] | None,
    eval_dataset: str | None,
    data_lines: Sequence[str],
    settings: Mapping[str, Any],
    tags: Sequence[str] = (),
    library: str = "transformers",
) -> str:
    """The card's text. `results` are the table's columns; `final` goes into `model-index`;
    `library` is `peft` for an adapter."""
    from huggingface_hub import EvalResult, ModelCardData

    from raykit import __version__

    hub_ids = [m for m in (hub_id(b) for b in base_models) if m]
    numeric = {k: v for k, v in (final or {}).items() if isinstance(v, (int, float))}
    metadata = ModelCardData(
        library_name=library,
        pipeline_tag="text-ranking",
        tags=["raykit", "reranker", "cross-encoder", *tags],
        base_model=(hub_ids[0] if len(hub_ids) == 1 else hub_ids) or None,
        model_name=name if numeric else None,
        eval_results=[
            EvalResult(
                task_type="text-ranking",
                task_name="Reranking",
                dataset_type="custom",
                dataset_name=eval_dataset or "evaluation data",
                metric_type=metric_type(k),
                metric_name=k,
                metric_value=round(float(v), 4),
            )
            for k, v in numeric.items()
        ]
        or None,
    )
    bases = ", ".join(f"`{b}`" for b in base_models)
    settings_yaml = yaml.safe_dump(dict(settings), sort_keys=False).strip() if settings else "{}"
    return (
        "---\n" + metadata.to_yaml() + "\n---\n\n"
        f"# {name}\n\n{summary_line} from {bases} with raykit {__version__}.\n\n"
        "## Evaluation\n\n" + results_table(results) + "\n"
        "## Data\n\n" + "".join(f"- {line}\n" for line in data_lines) + "\n"
        "## Settings\n\nThe settings that differ from raykit's defaults:\n\n"
        f"```yaml\n{settings_yaml}\n```\n\n"
        "## Usage\n\n" + usage(name)
    )


def finetune_card(
    cfg: Any,
    summary: Mapping[str, Any],
    best: Mapping[str, float],
    data_lines: Sequence[str],
    summary_line: str = "A reranker fine-tuned",
) -> str:
    """The card of a fine-tune (or of a sweep's best trial, `summary_line` saying so)."""
    name = os.path.basename(os.path.normpath(cfg.output_dir)) or "reranker"
    before = summary.get("eval_before")
    measures = list(getattr(cfg, "metrics", []) or [])
    best = {k: v for k, v in best.items() if k in measures} if measures else dict(best)
    step = summary.get("steps")
    tags, library = ["fine-tuned"], "transformers"
    if getattr(cfg, "use_lora", False):
        summary_line += f" with LoRA (rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g})"
        tags.append("lora")
        if not cfg.save_merged_model:
            summary_line = "A LoRA adapter: " + summary_line[0].lower() + summary_line[1:]
            library = "peft"
    results = {
        "before training": before,
        f"best checkpoint (of {step} steps)" if step else "best checkpoint": best,
    }
    dataset = ", ".join(os.path.basename(p) for p in cfg.eval_data) or None
    return render_card(
        name=name,
        summary_line=summary_line,
        base_models=[cfg.model_name_or_path],
        results=results,
        final=best,
        eval_dataset=dataset,
        data_lines=data_lines,
        settings=changed_settings(cfg),
        tags=tags,
        library=library,
    )


def mix_card(cfg: Any, summary: Mapping[str, Any]) -> str:
    """The card of a `raykit mix` output: the models and their weights."""
    name = os.path.basename(os.path.normpath(cfg.output)) or "reranker"
    weights = ", ".join(
        f"`{m}` x {w:.4f}" for m, w in zip(summary["models"], summary["weights"], strict=True)
    )
    lines = [f"a weighted average of the parameters of {len(summary['models'])} models: {weights}"]
    if summary.get("example_losses"):
        lines.append(
            f"weights from the models' losses on the example data ({', '.join(cfg.example_data)})"
        )
    return render_card(
        name=name,
        summary_line="A reranker merged",
        base_models=cfg.models,
        results={},
        final=None,
        eval_dataset=None,
        data_lines=lines,
        settings=changed_settings(cfg),
        tags=["merge"],
    )


def write_card(folder: str, text: str) -> None:
    with open(os.path.join(folder, CARD_FILE), "w") as f:
        f.write(text)

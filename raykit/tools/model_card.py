"""Model cards: a `README.md` in Hugging Face's model-card format for every model raykit exports
(`finetune`'s output_dir, `tune`'s best, `mix`'s output), so that on a hub or a shared drive a
model says what it is, what it came from, what it was trained on and how well it ranks.

The YAML metadata is huggingface_hub's `ModelCardData` (`library_name`, `base_model`,
`pipeline_tag`, `tags`, and `model-index` built from `EvalResult`s); the body has the results table,
the data summary, the settings that differ from raykit's defaults and how to load the model.
"""

from __future__ import annotations

import dataclasses
import json
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


PAIRS = '[["what is ray?", "a distributed compute engine"], ["what is ray?", "a fruit"]]'


def usage(name: str, folder: str) -> str:
    """Code that scores pairs with the model in `folder` (named `name` in the code): raykit,
    plain transformers as its spec says, and sentence-transformers (an encoder, or a decoder
    whose prompt raykit wrote as its chat template). The tests run these snippets and compare
    their scores with raykit's."""
    from raykit.core.spec import SPEC_FILE

    spec_file = os.path.join(folder, SPEC_FILE)
    spec = {"kind": "encoder"}
    if os.path.isfile(spec_file):
        with open(spec_file) as f:
            spec = json.load(f)
    raykit_code = (
        f"from raykit import Reranker\n\nreranker = Reranker({name!r})\n"
        f"scores = reranker.compute_score({PAIRS})\n"
        'reranker.rerank("what is ray?", ["a fruit", "a distributed compute engine"])\n'
    )
    blocks = [raykit_code]
    if spec["kind"] == "decoder":
        blocks.append(_decoder_code(name, spec))
        if os.path.isfile(os.path.join(folder, "chat_template.jinja")):  # the prompt, for it
            blocks.append(_sentence_transformers_code(name))
    else:
        blocks += [_encoder_code(name, spec.get("max_len", 512)), _sentence_transformers_code(name)]
    return "".join(f"```python\n{code}```\n\n" for code in blocks)


def _encoder_code(name: str, max_len: int) -> str:
    return f"""# transformers: the score is the one logit of a sequence classifier
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({name!r})
model = AutoModelForSequenceClassification.from_pretrained({name!r}).eval()
pairs = {PAIRS}
batch = tokenizer(
    pairs, padding=True, truncation="only_second", max_length={max_len}, return_tensors="pt"
)
with torch.no_grad():
    scores = model(**batch).logits[:, 0].tolist()
"""


def _sentence_transformers_code(name: str) -> str:
    return f"""# sentence-transformers: sigmoid(score), as raykit's normalised scores
from sentence_transformers import CrossEncoder

scores = CrossEncoder({name!r}).predict({PAIRS}).tolist()
"""


def _decoder_code(name: str, spec: dict[str, Any]) -> str:
    template = spec["template"]
    bos = "[tokenizer.bos_token_id] + " if template.get("add_bos") else ""
    return f"""# transformers: the score is logit(yes) - logit(no) at the last token of the prompt
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({name!r})
model = AutoModelForCausalLM.from_pretrained({name!r}).eval()
prefix = {template["prefix"]!r}
pair = {template["pair"]!r}
suffix = {template["suffix"]!r}
instruction = {template["instruction"]!r}
# the ids of {template["yes_token"]!r} and {template["no_token"]!r}
yes_id, no_id = {spec["yes_token_id"]}, {spec["no_token_id"]}


def encode(text):
    return tokenizer.encode(text, add_special_tokens=False)


scores = []
for query, document in {PAIRS}:
    text = pair.format(instruction=instruction, query=query, document=document)
    ids = {bos}encode(prefix) + encode(text) + encode(suffix)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    scores.append((logits[yes_id] - logits[no_id]).item())
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
    )


def finetune_card(
    cfg: Any,
    summary: Mapping[str, Any],
    best: Mapping[str, float],
    data_lines: Sequence[str],
    summary_line: str = "A reranker fine-tuned",
) -> str:
    """The card of a fine-tune (or of a sweep's best trial, `summary_line` saying so)."""
    name = card_name(cfg.output_dir)
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
    name = card_name(cfg.output)
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


def card_name(output: str) -> str:
    """How the card names the model: its output folder's name."""
    return os.path.basename(os.path.normpath(output)) or "reranker"


def write_card(folder: str, text: str, name: str) -> None:
    """The card `text` with its usage section, written for the model as it is in `folder`
    (to be published as `name`)."""
    with open(os.path.join(folder, CARD_FILE), "w") as f:
        f.write(text + "## Usage\n\n" + usage(name, folder))

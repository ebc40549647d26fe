"""A tiny random BERT cross-encoder with a WordPiece tokenizer trained on the given texts."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FILES = (
    ROOT / "examples" / "data" / "train.jsonl",
    ROOT / "examples" / "data" / "dev.jsonl",
)


def sample_texts() -> list[str]:
    texts = []
    for path in SAMPLE_FILES:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [row["query"], *row["pos"], *row["neg"]]
    return texts


def build_tiny_reranker(
    out: str | Path,
    texts: Iterable[str] | None = None,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    head: bool = True,
) -> str:
    """Save a random `BertForSequenceClassification(num_labels=1)` and its tokenizer to `out`
    (with `head=False` a plain `BertModel`, like a base encoder)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        PreTrainedTokenizerFast,
    )

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        list(texts or sample_texts()),
        trainers.WordPieceTrainer(vocab_size=600, special_tokens=special),
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=max(2, hidden_size // 64), intermediate_size=hidden_size * 2,
        max_position_embeddings=512, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    (BertForSequenceClassification if head else BertModel)(config).save_pretrained(out)
    return str(out)


def train_tiny(
    model_dir: str, groups: list[list[str]], out: str | Path, steps: int = 40, lr: float = 1e-3
) -> str:
    """A copy of `model_dir` after `steps` of group-softmax training on `groups`
    ([query, positive, negative, ...], all the same length), so its scores mean something.

    Full-batch Adam without dropout at a moderate learning rate: deterministic, and it never
    collapses to constant scores (at 3e-3 with dropout a 2-layer BERT sometimes did)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raykit.model import group_softmax_loss

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [[group[0], passage] for group in groups for passage in group[1:]]
    batch = tokenizer(pairs, padding=True, truncation=True, max_length=64, return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.eval()  # no dropout; gradients flow all the same
    for _ in range(steps):
        loss = group_softmax_loss(model(**batch).logits.view(-1), len(groups[0]) - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)

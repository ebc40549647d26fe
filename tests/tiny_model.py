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


DECODER_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<bos>"]


def build_tiny_decoder(
    out: str | Path,
    family: str = "qwen3",
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
) -> str:
    """Save a random causal LM (`qwen3`, `gemma` or `llama`; 2 layers, hidden 64 unless told)
    and a byte-level BPE tokenizer trained on the sample data and the prompt templates, with the
    chat special tokens and yes/no/Yes/No as single tokens."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from raykit.prompts import TEMPLATES

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    prompts = [t.prefix + t.pair + t.suffix for t in TEMPLATES.values()]
    tokenizer.train_from_iterator(
        sample_texts() + prompts * 20,
        trainers.BpeTrainer(vocab_size=700, special_tokens=DECODER_SPECIAL,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", bos_token="<bos>")  # fmt: skip
    fast.add_tokens(["yes", "no", "Yes", "No"])
    torch.manual_seed(seed)
    shape = dict(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                 num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=max(1, heads // 2), head_dim=hidden_size // heads,
                 max_position_embeddings=1024, pad_token_id=fast.pad_token_id,
                 bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)  # fmt: skip
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**shape, tie_word_embeddings=True))
    elif family == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**shape))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return str(out)

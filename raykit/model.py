"""The cross-encoder for training: loading, the chunked forward module DDP wraps, and the losses.

Inference (every scoring path, `Reranker` included) lives in `raykit.engine`."""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from raykit.config import ConfigError, resolve_model_path
from raykit.engine import CHUNK_COST_TOKENS, chunk_by_length, pad_encodings
from raykit.storage import is_uri


def local_model_path(model: str) -> str:
    """A local directory or hub id for `model`: URIs (s3://, gs://, ...) are copied to a local
    cache once per machine (atomically, so concurrent actors never read a partial copy)."""
    if not is_uri(model):
        return resolve_model_path(model)
    import hashlib
    import tempfile

    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(model)
    files = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    if not any(f.base_name in ("config.json", "adapter_config.json") for f in files):
        raise FileNotFoundError(f"{model}: no config.json or adapter_config.json there")
    # The cache key covers every file's size and mtime: a model re-written at the same URI is
    # copied again, never served stale.
    signature = model + "".join(f"|{f.path}:{f.size}:{f.mtime_ns}" for f in files)
    root = os.path.join(tempfile.gettempdir(), "raykit-models")
    target = os.path.join(root, hashlib.sha1(signature.encode()).hexdigest()[:16])
    if not os.path.isdir(target):  # renamed into place whole, so present means complete
        os.makedirs(root, exist_ok=True)
        partial = tempfile.mkdtemp(dir=root)
        pafs.copy_files(path, partial, source_filesystem=fs)
        try:
            os.rename(partial, target)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return target


def check_model(name_or_path: str, field: str = "model") -> None:
    """Fail fast, in one line, when a model can be found neither locally nor on the hub."""
    if is_uri(name_or_path):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(name_or_path)
        infos = fs.get_file_info([f"{path}/config.json", f"{path}/adapter_config.json"])
        if all(info.type == pafs.FileType.NotFound for info in infos):
            raise ConfigError(f"{field}: no config.json or adapter_config.json in {name_or_path}")
        return
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path):
        from raykit.lora import adapter_base, is_adapter_dir

        if is_adapter_dir(path):
            check_model(adapter_base(path), f"{field} (the base named in {path})")
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{field}: {name_or_path} is a folder without a config.json")
        return
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
        raise ConfigError(
            f"{field}: {name_or_path!r} is neither a local folder nor a model id for the "
            "Hugging Face hub (no such folder)"
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{field}: {name_or_path!r} is neither a local folder nor a model reachable on the "
            f"Hugging Face hub ({reason[:200]})"
        ) from None


def load_model_and_tokenizer(
    name_or_path: str,
    trust_remote_code: bool = False,
    decoder: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """A reranker and its tokenizer: a one-logit sequence classifier (a new head is created if
    missing) or, with `decoder`, a causal LM. An adapter folder (LoRA) is loaded on the base it
    names and merged, so callers always get a plain transformers model.

    `name_or_path` is a hub id, a local directory, an embedded name or a URI (s3://...);
    `dtype` is the weights' dtype (a LoRA run keeps its frozen base in bf16/fp16)."""
    from transformers import AutoModelForCausalLM

    from raykit.lora import adapter_base, is_adapter_dir, load_adapter, merge

    path = local_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if is_adapter_dir(path):
        base, _ = load_model_and_tokenizer(adapter_base(path), trust_remote_code, decoder, dtype)
        return merge(load_adapter(base, path)), tokenizer
    if decoder:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=dtype
        )
        return model, tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, trust_remote_code=trust_remote_code, dtype=dtype
    )
    if model.config.num_labels != 1:
        raise ValueError(f"{name_or_path}: expected a model with one output logit")
    return model, tokenizer


def model_config_path(path: str) -> str:
    """The folder whose config.json describes the model at local `path` (an adapter's base)."""
    from raykit.lora import adapter_base, is_adapter_dir

    return local_model_path(adapter_base(path)) if is_adapter_dir(path) else path


class CrossEncoder(nn.Module):
    """Scores a list of padded chunks in one `forward` call and returns the logits in order.

    Keeping the chunking inside one module means DDP sees a single forward per step, while each
    chunk is padded only to its own longest pair. With `yes_no` (token ids) the model is a
    decoder reranker: chunks are left-padded prompts and the score is logit(yes) - logit(no) at
    the last position, as in `raykit.engine`.
    """

    def __init__(self, hf_model: nn.Module, yes_no: tuple[int, int] | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.yes_no = yes_no

    def score(self, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.yes_no is None:
            return self.hf_model(**chunk).logits.view(-1)
        last = self.hf_model(**chunk, logits_to_keep=1).logits[:, -1, :]
        return last[:, self.yes_no[0]] - last[:, self.yes_no[1]]

    def forward(self, chunks: list[dict[str, torch.Tensor]], order: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([self.score(chunk) for chunk in chunks])
        # `order[i]` is the position in `logits` of the i-th pair of the input.
        return logits[order]


def make_chunks(
    encodings: list[dict[str, list[int]]],
    token_budget: int | None,
    pad_id: int,
    device: torch.device,
    left: bool = False,
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, int]:
    """Sort pairs by length into padded chunks (`left`-padded for decoders); returns chunks,
    the restoring order, pad tokens. `token_budget` None: all pairs in one chunk."""
    lengths = [len(e["input_ids"]) for e in encodings]
    cost = CHUNK_COST_TOKENS.get(torch.device(device).type, CHUNK_COST_TOKENS["cuda"])
    if token_budget is None:
        chunks_index = [list(range(len(lengths)))]
    else:
        chunks_index = chunk_by_length(lengths, token_budget, chunk_cost=cost)
    chunks, flat, padded = [], [], 0
    for index in chunks_index:
        batch = pad_encodings([encodings[i] for i in index], pad_id, left=left)
        padded += batch["input_ids"].numel()
        chunks.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        flat += index
    order = torch.empty(len(flat), dtype=torch.long)
    order[torch.tensor(flat)] = torch.arange(len(flat))
    return chunks, order.to(device), padded - sum(lengths)


# ---------------------------------------------------------------------------- losses


def group_softmax_loss(logits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Cross-entropy over each group with the positive at index 0."""
    scores = logits.float().view(-1, group_size)
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores, target)


def distillation_loss(
    logits: torch.Tensor, teacher_scores: torch.Tensor, group_size: int, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) over each group's softmax at `temperature`, scaled by T^2."""
    student = F.log_softmax(logits.float().view(-1, group_size) / temperature, dim=-1)
    teacher = F.softmax(teacher_scores.float().view(-1, group_size) / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean") * temperature**2

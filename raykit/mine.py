"""Hard-negative mining: retrieve candidates for each training query and add them as negatives.

    input groups -> retrieve (BM25 with `bm25s`, or a dense encoder on a Ray Data actor pool)
    -> candidates at ranks [lo:hi] minus the positives, the query and the known negatives
    -> optional false-negative filter (a cross-encoder on a Ray Data actor pool)
    -> sample `negatives` per query -> JSONL in the training format.

Nothing is padded or dropped silently: queries that got fewer than `negatives` candidates, the
candidates the filter dropped, skipped input rows and removed teacher scores are all counted in
the summary.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from raykit.cluster import init_ray
from raykit.config import MineConfig, resolve_model_path
from raykit.console import RowProgress, logger
from raykit.data import (
    MAX_REPORTED_ERRORS,
    DataError,
    DataReport,
    collect_groups,
    expand_paths,
    lone_surrogate,
    raise_for_invalid,
    read_lines,
)
from raykit.model import check_model
from raykit.storage import absolute, check_writable, filesystem, is_uri

ROWS_PER_BLOCK = 256  # unit of work of an embedding or filter actor


# ---------------------------------------------------------------------------- inputs


def read_corpus(paths: list[str]) -> list[str]:
    """Unique `text` values of corpus JSONL files, in first-seen order; bad rows are errors."""
    texts: dict[str, None] = {}
    errors: list[str] = []
    for path in expand_paths(paths):
        for number, line, problem in read_lines(path):
            if problem is not None:
                errors.append(f"{path}:{number}: -: {problem}")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{number}: -: invalid JSON: {exc.msg}")
                continue
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip() or lone_surrogate(text):
                errors.append(f"{path}:{number}: text: expected a non-empty Unicode string")
                continue
            texts[text] = None
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        raise DataError(f"{len(errors)} invalid corpus row(s):\n  {shown}")
    if not texts:
        raise DataError(f"corpus: no texts in {', '.join(paths)}")
    return list(texts)


def beir_groups(cfg: MineConfig) -> tuple[list[dict], list[str], DataReport]:
    """Groups {query, pos} from BEIR-layout queries, qrels (relevance > 0) and corpus, the
    corpus texts (a title before its text, as `score --run` reads them) and what was skipped:
    qrels lines whose query or document has no text."""
    from raykit.trec import iter_corpus, read_qrels, read_queries

    queries = read_queries(cfg.queries)
    documents = dict(iter_corpus(cfg.corpus))
    positives: dict[str, list[str]] = {}
    report = DataReport(files=[cfg.qrels])
    for qid, doc_id, relevance in read_qrels(cfg.qrels):
        if relevance <= 0:
            continue
        if qid not in queries:
            report.skipped["qrels: query not in --queries"] += 1
        elif doc_id not in documents:
            report.skipped["qrels: document not in --corpus"] += 1
        else:
            positives.setdefault(qid, []).append(documents[doc_id])
    if not positives:
        raise DataError(f"{cfg.qrels}: no relevant document with a query and a text")
    groups = [{"query": queries[qid], "pos": texts} for qid, texts in positives.items()]
    report.valid_rows = len(groups)
    return groups, list(dict.fromkeys(documents.values())), report


def pooled_corpus(groups: list[dict]) -> list[str]:
    """Every pos and neg text of the groups, once each."""
    texts: dict[str, None] = {}
    for group in groups:
        for text in list(group["pos"]) + list(group.get("neg") or []):
            texts[text] = None
    return list(texts)


# ---------------------------------------------------------------------------- retrieval


def retrieve_bm25(queries: list[str], corpus: list[str], k: int) -> list[list[int]]:
    """Corpus indices of the top `k` BM25 hits per query (hits with score 0 are not hits)."""
    return [[doc for doc, _ in hits] for hits in retrieve_bm25_scored(queries, corpus, k)]


def retrieve_bm25_scored(
    queries: list[str], corpus: list[str], k: int
) -> list[list[tuple[int, float]]]:
    """(corpus index, BM25 score) of the top `k` hits per query, best first, scores > 0."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False),
                    show_progress=False)  # fmt: skip
    tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    hits, scores = retriever.retrieve(tokens, k=min(k, len(corpus)), show_progress=False)
    return [
        [(int(doc), float(score)) for doc, score in zip(row_hits, row_scores, strict=True)
         if score > 0]
        for row_hits, row_scores in zip(hits, scores, strict=True)
    ]  # fmt: skip


class TextEmbedder:
    """Ray Data actor: mean-pooled, L2-normalised embeddings of the `text` column."""

    def __init__(self, cfg: MineConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from raykit.engine import quantize_int8, resolve_dtype, torch_dtype

        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        path = resolve_model_path(cfg.embedder)
        self.device = torch.device("cuda" if cfg.use_gpu else "cpu")
        remote = cfg.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        self.model = AutoModel.from_pretrained(path, trust_remote_code=remote)
        self.model.to(self.device).eval()
        self.cfg = cfg
        precision = resolve_dtype(cfg.precision, self.device.type)
        if precision == "int8":
            self.model = quantize_int8(self.model)
        self.autocast_dtype = torch_dtype(precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        texts = [str(t) for t in batch["text"]]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        step = self.cfg.batch_size
        for start in range(0, len(order), step):
            index = order[start : start + step]
            inputs = self.tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                    max_length=self.cfg.max_len, return_tensors="pt")  # fmt: skip
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            enabled = self.autocast_dtype is not None
            autocast = torch.autocast(self.device.type, self.autocast_dtype, enabled=enabled)
            with torch.inference_mode(), autocast:
                hidden = self.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[index] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return {"row": batch["row"], "embedding": out}


class PairFilterScorer:
    """Ray Data actor: sigmoid cross-encoder scores of (`query`, `passage`) rows."""

    def __init__(self, cfg: MineConfig):
        from raykit.engine import InferenceEngine, sigmoid_array

        self.sigmoid = sigmoid_array
        assert cfg.filter_model is not None
        self.engine = InferenceEngine.from_config(
            cfg, cfg.filter_model, use_gpu=cfg.use_gpu, threads=cfg.cpus_per_actor,
            max_batch_size=cfg.batch_size,
        )  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [[str(q), str(p)] for q, p in zip(batch["query"], batch["passage"], strict=True)]
        scores = self.sigmoid(self.engine.score_pairs(pairs))
        return {"row": batch["row"], "score": scores.astype(np.float32)}


def map_on_actors(columns: dict[str, list], actor: type, cfg: MineConfig, output: str) -> list:
    """Run `actor` over the rows on a Ray Data actor pool; its `output` column, in row order."""
    n = len(next(iter(columns.values())))
    table = pa.table({"row": np.arange(n), **columns})
    blocks = [table.slice(i, ROWS_PER_BLOCK) for i in range(0, n, ROWS_PER_BLOCK)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        actor,
        batch_size=ROWS_PER_BLOCK,
        batch_format="numpy",
        fn_constructor_kwargs={"cfg": cfg},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0,
    )
    values: list = [None] * n
    progress, done = RowProgress(n, f"mine: {actor.__name__}"), 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for row, value in zip(batch["row"], batch[output], strict=True):
            values[int(row)] = value
        done += len(batch["row"])
        progress.update(done)
    progress.close()
    return values


def retrieve_dense(
    queries: list[str], corpus: list[str], k: int, cfg: MineConfig
) -> list[list[int]]:
    """Corpus indices of the top `k` hits per query by exact inner product of embeddings."""
    import torch

    texts = [cfg.query_instruction + q for q in queries] + corpus
    embeddings = torch.from_numpy(np.stack(map_on_actors({"text": texts}, TextEmbedder, cfg,
                                                         "embedding")))  # fmt: skip
    query_emb, corpus_emb = embeddings[: len(queries)], embeddings[len(queries) :]
    hits: list[list[int]] = []
    for start in range(0, len(queries), 1024):  # bounded memory: 1024 x corpus scores at a time
        scores = query_emb[start : start + 1024] @ corpus_emb.T
        hits += scores.topk(min(k, len(corpus)), dim=1).indices.tolist()
    return hits


# ---------------------------------------------------------------------------- mining


def candidate_negatives(
    group: dict, ranked: list[int], corpus: list[str], lo: int, hi: int, keep_neg: bool
) -> list[str]:
    """Texts at ranks [lo:hi] that are not a positive, the query, or (if kept) a known negative."""
    excluded = {t.strip() for t in group["pos"]} | {group["query"].strip()}
    if keep_neg:
        excluded |= {t.strip() for t in group.get("neg") or []}
    return [corpus[i] for i in ranked[lo:hi] if corpus[i].strip() not in excluded]


def filter_false_negatives(
    groups: list[dict], candidates: list[list[str]], cfg: MineConfig
) -> tuple[list[list[str]], int]:
    """Drop candidates that the filter model scores above margin x its best positive's score."""
    queries, passages, owner = [], [], []
    for g, (group, texts) in enumerate(zip(groups, candidates, strict=True)):
        if not texts:
            continue
        for text in list(group["pos"]) + texts:
            queries.append(group["query"])
            passages.append(text)
            owner.append(g)
    scores = map_on_actors({"query": queries, "passage": passages}, PairFilterScorer, cfg, "score")
    kept: list[list[str]] = [list(t) for t in candidates]
    dropped, i = 0, 0
    for g, (group, texts) in enumerate(zip(groups, candidates, strict=True)):
        if not texts:
            continue
        n_pos = len(group["pos"])
        threshold = cfg.filter_margin * max(scores[i : i + n_pos])
        cand_scores = scores[i + n_pos : i + n_pos + len(texts)]
        kept[g] = [t for t, s in zip(texts, cand_scores, strict=True) if s <= threshold]
        dropped += len(texts) - len(kept[g])
        i += n_pos + len(texts)
    return kept, dropped


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records to a local path or URI, replacing it only once complete."""
    fs, target = filesystem(path)
    parent = os.path.dirname(target)
    if parent:
        fs.create_dir(parent, recursive=True)
    partial = f"{target}.inprogress"
    with fs.open_output_stream(partial) as out:
        for record in records:
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    if fs.get_file_info(target).type != pafs.FileType.NotFound:
        fs.delete_file(target)
    fs.move(partial, target)


def run_mine(cfg: MineConfig) -> dict[str, Any]:
    """Mine negatives for every valid input group; returns (and prints) the run summary."""
    cfg.validate()
    started = time.time()
    if cfg.retriever == "dense":
        check_model(cfg.embedder, "embedder")
    if cfg.filter_model:
        check_model(cfg.filter_model, "filter_model")
    if not is_uri(cfg.output):
        check_writable(os.path.dirname(absolute(cfg.output)), "output")
    if cfg.qrels:
        groups, corpus, report = beir_groups(cfg)
    else:
        groups, report = collect_groups(cfg.input, require_neg=False)
        if not cfg.skip_invalid:
            raise_for_invalid(report, " in the input (use --skip_invalid to skip them)")
        if not groups:
            raise DataError(f"input: no valid groups in {', '.join(cfg.input)}")
        corpus = read_corpus(cfg.corpus) if cfg.corpus else pooled_corpus(groups)
    lo, hi = cfg.sample_range
    queries = [g["query"] for g in groups]
    if cfg.retriever == "dense" or cfg.filter_model:
        init_ray(cfg.num_actors * cfg.cpus_per_actor)
    if cfg.retriever == "bm25":
        ranked = retrieve_bm25(queries, corpus, hi)
    else:
        ranked = retrieve_dense(queries, corpus, hi, cfg)
    keep_neg = not cfg.replace_neg
    candidates = [
        candidate_negatives(g, r, corpus, lo, hi, keep_neg)
        for g, r in zip(groups, ranked, strict=True)
    ]
    filtered_out = 0
    if cfg.filter_model:
        candidates, filtered_out = filter_false_negatives(groups, candidates, cfg)
    records, stats = sample_negatives(groups, candidates, corpus, cfg)
    write_jsonl(cfg.output, records)
    summary = {
        "groups_in": len(groups) + report.invalid_rows,
        "groups_out": len(records),
        "rows_skipped": report.invalid_rows,
        "skipped_reasons": dict(report.skipped),
        "corpus_texts": len(corpus),
        "retriever": cfg.retriever,
        **stats,
        "filtered_out": filtered_out,
        "wall_s": round(time.time() - started, 2),
        "output": cfg.output,
    }
    logger.info("mine summary: " + json.dumps(summary))
    if stats["groups_without_negatives"]:
        logger.warning(f"mine: {stats['groups_without_negatives']} group(s) found no negative "
                       "and were left out of the output")  # fmt: skip
    if stats["short_queries"]:
        how = "topped up with random texts" if cfg.pad_random else "kept with fewer negatives"
        logger.warning(f"mine: {stats['short_queries']} of {len(groups)} queries had fewer "
                       f"than {cfg.negatives} candidates ({how})")  # fmt: skip
    return summary


def sample_negatives(
    groups: list[dict], candidates: list[list[str]], corpus: list[str], cfg: MineConfig
) -> tuple[list[dict], dict[str, int]]:
    """Output records (input keys kept, `neg` extended or replaced) and the sampling counts."""
    rng = random.Random(cfg.seed)
    stats = dict.fromkeys(["negatives_mined", "short_queries", "padded_random",
                           "groups_without_negatives", "teacher_scores_removed"], 0)  # fmt: skip
    records = []
    for group, texts in zip(groups, candidates, strict=True):
        chosen = rng.sample(texts, cfg.negatives) if len(texts) > cfg.negatives else list(texts)
        if len(chosen) < cfg.negatives:
            stats["short_queries"] += 1
            if cfg.pad_random:
                chosen += random_texts(group, chosen, corpus, cfg.negatives - len(chosen), rng)
                stats["padded_random"] += 1
        stats["negatives_mined"] += len(chosen)
        record = dict(group)
        record["neg"] = chosen if cfg.replace_neg else list(group.get("neg") or []) + chosen
        if "pos_scores" in record or "neg_scores" in record:
            # Teacher scores no longer match the negatives: keep the data trainable.
            record.pop("pos_scores", None)
            record.pop("neg_scores", None)
            stats["teacher_scores_removed"] += 1
        if not record["neg"]:  # not trainable: counted, not written
            stats["groups_without_negatives"] += 1
            continue
        records.append(record)
    return records, stats


def random_texts(
    group: dict, chosen: list[str], corpus: list[str], n: int, rng: random.Random
) -> list[str]:
    """Up to `n` random corpus texts that are not a positive, the query or already chosen."""
    excluded = {t.strip() for t in list(group["pos"]) + list(group.get("neg") or []) + chosen}
    excluded.add(group["query"].strip())
    picked: list[str] = []
    for _ in range(20 * n):  # rejection sampling: no copy of a large corpus per query
        text = corpus[rng.randrange(len(corpus))]
        if text.strip() not in excluded:
            picked.append(text)
            excluded.add(text.strip())
            if len(picked) == n:
                break
    return picked

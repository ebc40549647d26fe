"""`raykit mine`: add retrieved hard negatives (BM25 or dense) to training groups, optionally
dropping likely false negatives with a reranker."""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import pyarrow.fs as pafs

from raykit.config import MineConfig
from raykit.core.loading import check_model
from raykit.core.spec import check_reranker
from raykit.data.groups import (
    MAX_REPORTED_ERRORS,
    DataError,
    DataReport,
    collect_groups,
    expand_paths,
    lone_surrogate,
    raise_for_invalid,
    read_lines,
)
from raykit.mining.bm25 import retrieve_bm25
from raykit.mining.dense import retrieve_dense
from raykit.mining.filter import filter_false_negatives
from raykit.runtime.cluster import init_ray
from raykit.runtime.logs import logger
from raykit.runtime.storage import absolute, check_writable, filesystem, is_uri


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
    from raykit.data.trec import iter_corpus, read_qrels, read_queries

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


def candidate_negatives(
    group: dict, ranked: list[int], corpus: list[str], lo: int, hi: int, keep_neg: bool
) -> list[str]:
    """Texts at ranks [lo:hi] that are not a positive, the query, or (if kept) a known negative."""
    excluded = {t.strip() for t in group["pos"]} | {group["query"].strip()}
    if keep_neg:
        excluded |= {t.strip() for t in group.get("neg") or []}
    return [corpus[i] for i in ranked[lo:hi] if corpus[i].strip() not in excluded]


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
    cfg.check_paths()
    cfg.check_hardware(cfg.use_gpu)
    started = time.time()
    if cfg.retriever == "dense":
        check_model(cfg.embedder, "embedder")
    if cfg.filter_model:
        check_reranker(cfg.filter_model, cfg, "filter_model")
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
        logger.warning(
            f"mine: {stats['groups_without_negatives']} group(s) found no negative "
            "and were left out of the output"
        )
    if stats["short_queries"]:
        how = "topped up with random texts" if cfg.pad_random else "kept with fewer negatives"
        logger.warning(
            f"mine: {stats['short_queries']} of {len(groups)} queries had fewer "
            f"than {cfg.negatives} candidates ({how})"
        )
    return summary


def sample_negatives(
    groups: list[dict], candidates: list[list[str]], corpus: list[str], cfg: MineConfig
) -> tuple[list[dict], dict[str, int]]:
    """Output records (input keys kept, `neg` extended or replaced) and the sampling counts."""
    rng = random.Random(cfg.seed)
    stats = dict.fromkeys(
        [
            "negatives_mined",
            "short_queries",
            "padded_random",
            "groups_without_negatives",
            "teacher_scores_removed",
        ],
        0,
    )
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

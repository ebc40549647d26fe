"""`raykit score --run RUN --queries Q --corpus C`: rerank a first-stage TREC run.

The run's (query, document) pairs, with their texts from BEIR-layout queries and corpus, are
written as one pair file under the output directory (visible to every node when the output is
shared storage), scored by the normal `raykit score` pipeline ranked by `query_id`, and the
ranked rows are written back as a TREC run (`OUTPUT/RUN_NAME.trec`). Run lines whose query or
document text is missing are counted per reason in the summary, never dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from raykit.config import ScoreConfig
from raykit.data.trec import read_corpus, read_queries, read_run, trec_lines
from raykit.errors import DataError
from raykit.runtime.logs import logger
from raykit.runtime.storage import filesystem, join

PAIRS_DIR = "_run_pairs"


def run_stem(path: str) -> str:
    name = os.path.basename(path.split("://", 1)[-1])
    for ending in (".gz", ".trec", ".txt", ".run", ".tsv"):
        name = name.removesuffix(ending)
    return name or "run"


def write_run_pairs(cfg: ScoreConfig) -> tuple[str, dict[str, Any]]:
    """Write the run's pairs as JSONL under the output; (its path, what was read and skipped)."""
    run = read_run(cfg.run)
    queries = read_queries(cfg.queries)
    corpus = read_corpus(cfg.corpus, {entry.doc_id for entry in run})
    skipped: Counter = Counter()
    path = join(cfg.output, PAIRS_DIR, run_stem(cfg.run) + ".jsonl")
    fs, fs_path = filesystem(path)
    fs.create_dir(os.path.dirname(fs_path), recursive=True)
    written = 0
    with fs.open_output_stream(fs_path) as out:
        for entry in sorted(run, key=lambda e: e.rank):  # first-stage order within each query
            if entry.query_id not in queries:
                skipped["query not in --queries"] += 1
            elif entry.doc_id not in corpus:
                skipped["document not in --corpus"] += 1
            else:
                row = {
                    "query_id": entry.query_id,
                    "doc_id": entry.doc_id,
                    "first_stage_rank": entry.rank,
                    "first_stage_score": entry.score,
                    "query": queries[entry.query_id],
                    "passage": corpus[entry.doc_id],
                }
                out.write((json.dumps(row) + "\n").encode())
                written += 1
    if not written:
        raise DataError(
            f"{cfg.run}: none of its {len(run)} lines has a query in {cfg.queries} "
            f"and a document in the corpus"
        )
    report = {"run_lines": len(run), "run_pairs": written, "run_lines_skipped": dict(skipped)}
    return path, report


def write_trec_run(scored: str, out_path: str, tag: str) -> int:
    """The ranked rows of a scored Parquet file as a TREC run, queries in first-seen order."""
    fs, fs_path = filesystem(scored)
    with fs.open_input_file(fs_path) as handle:
        table = pq.read_table(handle, columns=["query_id", "doc_id", "rank", "score"])
    rows = sorted(
        zip(*(table[c].to_pylist() for c in ("query_id", "doc_id", "rank", "score")), strict=True),
        key=lambda r: r[2],
    )
    order = {qid: i for i, qid in enumerate(dict.fromkeys(table["query_id"].to_pylist()))}
    rows.sort(key=lambda r: order[r[0]])  # stable: by query, then rank
    fs, fs_path = filesystem(out_path)
    with fs.open_output_stream(fs_path) as out:
        out.write("".join(trec_lines(rows, tag)).encode())
    return len(rows)


def run_score_trec(cfg: ScoreConfig) -> dict[str, Any]:
    """Rerank `cfg.run`; returns the score summary with the run's counts and the TREC path."""
    from raykit.scoring.pipeline import run_score

    cfg.check_paths()
    pairs, report = write_run_pairs(cfg)
    table_format = "parquet" if cfg.format == "trec" else cfg.format
    scored_cfg = dataclasses.replace(
        cfg,
        input=[pairs],
        run=None,
        format=table_format,
        group_by="query_id",
        query_field="query",
        passage_field="passage",
        candidates_field="candidates",
    )
    try:
        summary = run_score(scored_cfg)
    finally:
        fs, fs_path = filesystem(pairs)
        fs.delete_dir(os.path.dirname(fs_path))
    stem = run_stem(cfg.run)
    summary.update(report)
    if cfg.format == "trec":
        trec = join(cfg.output, stem + ".trec")
        summary["trec_run"] = trec
        summary["trec_lines"] = write_trec_run(
            join(cfg.output, stem + ".parquet"), trec, cfg.run_tag
        )
    skipped = sum(report["run_lines_skipped"].values())
    note = f", {skipped} skipped ({report['run_lines_skipped']})" if skipped else ""
    reranked = f"; reranked run: {summary['trec_run']}" if "trec_run" in summary else ""
    logger.info(f"run: {report['run_lines']} lines, {report['run_pairs']} scored{note}{reranked}")
    return summary

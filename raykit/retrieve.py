"""`raykit bm25`: a first-stage BM25 run (bm25s) over BEIR-layout queries and corpus, written as
a TREC run for `raykit score --run` to rerank. Single process, for corpora that fit in memory; a
run from Pyserini, bm25s or a dense retriever works the same way."""

from __future__ import annotations

import os
from typing import Any

from raykit.config import RetrieveConfig
from raykit.console import logger
from raykit.errors import DataError
from raykit.mine import retrieve_bm25_scored
from raykit.storage import filesystem
from raykit.trec import iter_corpus, read_queries, trec_lines


def run_bm25(cfg: RetrieveConfig) -> dict[str, Any]:
    cfg.validate()
    queries = read_queries(cfg.queries)
    doc_ids, texts = [], []
    for doc_id, text in iter_corpus(cfg.corpus):
        doc_ids.append(doc_id)
        texts.append(text)
    if not queries or not texts:
        raise DataError(f"{cfg.queries if not queries else cfg.corpus[0]}: empty")
    qids = list(queries)
    hits = retrieve_bm25_scored([queries[q] for q in qids], texts, cfg.top_k)
    rows = [(qid, doc_ids[doc], rank, score)
            for qid, ranked in zip(qids, hits, strict=True)
            for rank, (doc, score) in enumerate(ranked, start=1)]  # fmt: skip
    fs, path = filesystem(cfg.output)
    if os.path.dirname(path):
        fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write("".join(trec_lines(rows, cfg.run_tag)).encode())
    empty = sum(1 for ranked in hits if not ranked)
    summary = {"queries": len(qids), "documents": len(texts), "run_lines": len(rows),
               "queries_without_hits": empty, "output": cfg.output}  # fmt: skip
    unmatched = f" ({empty} queries matched nothing)" if empty else ""
    logger.info(f"bm25: {len(rows)} lines for {len(qids)} queries over {len(texts)} documents"
                f"{unmatched} -> {cfg.output}")
    return summary

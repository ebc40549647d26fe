"""BM25 retrieval (bm25s): hard-negative mining's default retriever, and `raykit bm25`, a
first-stage run over BEIR-layout queries and corpus written as a TREC run for `raykit score
--run` to rerank. Single process, for corpora that fit in memory; a run from Pyserini, bm25s or
a dense retriever works the same way."""

from __future__ import annotations

import os
from typing import Any

from raykit.config import RetrieveConfig
from raykit.data.trec import iter_corpus, read_queries, trec_lines
from raykit.errors import DataError
from raykit.runtime.logs import logger
from raykit.runtime.storage import filesystem


def retrieve_bm25(queries: list[str], corpus: list[str], k: int) -> list[list[int]]:
    """Corpus indices of the top `k` BM25 hits per query (hits with score 0 are not hits)."""
    return [[doc for doc, _ in hits] for hits in retrieve_bm25_scored(queries, corpus, k)]


def retrieve_bm25_scored(
    queries: list[str], corpus: list[str], k: int
) -> list[list[tuple[int, float]]]:
    """(corpus index, BM25 score) of the top `k` hits per query, best first, scores > 0."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False
    )
    tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    hits, scores = retriever.retrieve(tokens, k=min(k, len(corpus)), show_progress=False)
    return [
        [
            (int(doc), float(score))
            for doc, score in zip(row_hits, row_scores, strict=True)
            if score > 0
        ]
        for row_hits, row_scores in zip(hits, scores, strict=True)
    ]


def run_bm25(cfg: RetrieveConfig) -> dict[str, Any]:
    cfg.check_paths()
    queries = read_queries(cfg.queries)
    doc_ids, texts = [], []
    for doc_id, text in iter_corpus(cfg.corpus):
        doc_ids.append(doc_id)
        texts.append(text)
    if not queries or not texts:
        raise DataError(f"{cfg.queries if not queries else cfg.corpus[0]}: empty")
    qids = list(queries)
    hits = retrieve_bm25_scored([queries[q] for q in qids], texts, cfg.top_k)
    rows = [
        (qid, doc_ids[doc], rank, score)
        for qid, ranked in zip(qids, hits, strict=True)
        for rank, (doc, score) in enumerate(ranked, start=1)
    ]
    fs, path = filesystem(cfg.output)
    if os.path.dirname(path):
        fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write("".join(trec_lines(rows, cfg.run_tag)).encode())
    empty = sum(1 for ranked in hits if not ranked)
    summary = {
        "queries": len(qids),
        "documents": len(texts),
        "run_lines": len(rows),
        "queries_without_hits": empty,
        "output": cfg.output,
    }
    unmatched = f" ({empty} queries matched nothing)" if empty else ""
    logger.info(
        f"bm25: {len(rows)} lines for {len(qids)} queries over {len(texts)} documents"
        f"{unmatched} -> {cfg.output}"
    )
    return summary

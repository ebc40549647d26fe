"""TREC runs and qrels, BEIR queries and corpus: the files rerankers are evaluated and used with.

- run: `qid Q0 docid rank score tag`, one line per ranked document;
- qrels: TREC `qid 0 docid rel`, or BEIR's `qrels/*.tsv` (`query-id corpus-id score`, header);
- queries: BEIR JSONL `{"_id", "text"}` or TSV `id<TAB>text`;
- corpus: BEIR JSONL `{"_id", "title"?, "text"}` or TSV `id<TAB>text` (`id<TAB>title<TAB>text`).

Every file may be local, gzipped or a URI (read through `raykit.data.groups.read_lines`); a bad line
is a one-line error naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from raykit.data.groups import read_lines
from raykit.errors import DataError


@dataclass(frozen=True)
class RunEntry:
    query_id: str
    doc_id: str
    rank: int
    score: float


def _lines(path: str) -> Iterator[tuple[int, str]]:
    for number, text, problem in read_lines(path):
        if problem:
            raise DataError(f"{path}:{number}: {problem}")
        yield number, text


def read_run(path: str) -> list[RunEntry]:
    """A TREC run, in file order; each (qid, docid) at most once."""
    entries, seen = [], set()
    for number, line in _lines(path):
        fields = line.split()
        if len(fields) != 6:
            raise DataError(
                f"{path}:{number}: expected 'qid Q0 docid rank score tag', got {line!r}"
            )
        qid, _, docid, rank, score, _ = fields
        try:
            entry = RunEntry(qid, docid, int(rank), float(score))
        except ValueError:
            raise DataError(
                f"{path}:{number}: rank must be an integer and score a number, "
                f"got {rank!r} and {score!r}"
            ) from None
        if (qid, docid) in seen:
            raise DataError(f"{path}:{number}: document {docid!r} listed twice for query {qid!r}")
        seen.add((qid, docid))
        entries.append(entry)
    if not entries:
        raise DataError(f"{path}: no ranked documents")
    return entries


def read_qrels(path: str) -> list[tuple[str, str, int]]:
    """(qid, docid, relevance) of TREC qrels or BEIR's TSV (its header line is skipped)."""
    qrels = []
    for number, line in _lines(path):
        fields = line.split()
        if number == 1 and fields and not _is_int(fields[-1]):
            continue  # BEIR's header
        if len(fields) == 3:
            qid, docid, rel = fields
        elif len(fields) == 4:
            qid, _, docid, rel = fields
        else:
            raise DataError(
                f"{path}:{number}: expected 'qid 0 docid rel' or "
                f"'query-id corpus-id score', got {line!r}"
            )
        if not _is_int(rel):
            raise DataError(f"{path}:{number}: relevance must be an integer, got {rel!r}")
        qrels.append((qid, docid, int(rel)))
    if not qrels:
        raise DataError(f"{path}: no judgements")
    return qrels


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _id_and_text(path: str, number: int, line: str, title_field: bool) -> tuple[str, str]:
    """(id, text) of a BEIR JSONL or a TSV line; a corpus title is put before the text."""
    if line.lstrip().startswith("{"):
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict) or "_id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{number}: expected an object with '_id' and 'text'")
        title = row.get("title") if title_field else None
        text = f"{title} {row['text']}" if isinstance(title, str) and title.strip() else row["text"]
        return str(row["_id"]), text
    fields = line.split("\t")
    if len(fields) < 2:
        raise DataError(f"{path}:{number}: expected a JSON object or 'id<TAB>text'")
    return fields[0].strip(), " ".join(f for f in fields[1:] if f.strip())


def read_queries(path: str) -> dict[str, str]:
    """Every query: id -> text."""
    queries = {}
    for number, line in _lines(path):
        qid, text = _id_and_text(path, number, line, title_field=False)
        queries[qid] = text
    return queries


def iter_corpus(paths: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(id, text) of every corpus document, streaming; a BEIR title is put before its text."""
    for path in paths:
        for number, line in _lines(path):
            yield _id_and_text(path, number, line, title_field=True)


def read_corpus(paths: Iterable[str], wanted: set[str]) -> dict[str, str]:
    """The texts of the documents in `wanted` (a run's): memory holds only those, however big
    the corpus is."""
    return {doc_id: text for doc_id, text in iter_corpus(paths) if doc_id in wanted}


def trec_lines(rows: Iterable[tuple[str, str, int, float]], tag: str) -> Iterator[str]:
    """`qid Q0 docid rank score tag` lines of (qid, docid, rank, score) rows."""
    for qid, doc_id, rank, score in rows:
        yield f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n"

"""Retrieval-style task data as mteb's retrieval split (`RetrievalSplitData`): BEIR folders (Retrieval) and
query/positive/negative rows (Reranking). gist.evaluation.tasks hands them to mteb's own task classes.

    split = read_retrieval(Path("data/mteb/SciFact"), "test")   # corpus, queries, relevant_docs, top_ranked
"""

from __future__ import annotations

import csv
from pathlib import Path

from gist.data.records import DataError, iter_records


def _read_jsonl_ids(path: Path, fields: tuple[str, ...]) -> dict[str, list]:
    """A BEIR corpus / queries file as columns; `_id` becomes `id` (a string), other fields as given."""
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (a Retrieval task needs corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"
        )
    out: dict[str, list] = {"id": [], **{f: [] for f in fields}}
    seen: set[str] = set()
    for row_no, record in iter_records(path):
        where = f"{path}: row {row_no}"
        if not isinstance(record, dict) or "_id" not in record:
            raise DataError(f"{where}: expected a JSON object with an '_id'")
        doc_id = str(record["_id"])
        if doc_id in seen:
            raise DataError(f"{where}: duplicate _id {doc_id!r}")
        seen.add(doc_id)
        out["id"].append(doc_id)
        for field in fields:
            value = record.get(field, "" if field == "title" else None)
            if not isinstance(value, str):
                raise DataError(f"{where}: column {field!r} must be a string, got {type(value).__name__}")
            out[field].append(value)
    return out


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels (`query-id`, `corpus-id`, `score`, tab-separated, with a header) -> {query: {doc: score}}."""
    if not path.is_file():
        raise DataError(f"{path}: qrels file not found (a Retrieval task needs qrels/<split>.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{path}: row 1: the header must be query-id, corpus-id, score; got {header}")
        for row_no, row in enumerate(rows, start=2):
            try:
                query_id, doc_id, score = row
                qrels.setdefault(query_id, {})[doc_id] = int(score)
            except ValueError:
                raise DataError(
                    f"{path}: row {row_no}: expected query-id, corpus-id, integer score; got {row}"
                ) from None
    if not qrels:
        raise DataError(f"{path}: no rows")
    return qrels


def read_retrieval(task_dir: Path, split: str) -> dict:
    """A BEIR-layout folder -> mteb's retrieval split: corpus and queries as datasets, qrels as a dict.
    Queries without a relevant document are left out (as mteb's own loader does); every judged document
    must be in the corpus."""
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    corpus = _read_jsonl_ids(task_dir / "corpus.jsonl", ("title", "text"))
    queries = _read_jsonl_ids(task_dir / "queries.jsonl", ("text",))
    qrels = read_qrels(task_dir / "qrels" / f"{split}.tsv")
    doc_ids = set(corpus["id"])
    unknown = sorted({d for docs in qrels.values() for d in docs} - doc_ids)
    if unknown:
        raise DataError(f"{task_dir / 'qrels' / f'{split}.tsv'}: corpus-ids not in corpus.jsonl: {unknown[:5]}")
    missing = sorted(set(qrels) - set(queries["id"]))
    if missing:
        raise DataError(f"{task_dir / 'qrels' / f'{split}.tsv'}: query-ids not in queries.jsonl: {missing[:5]}")
    keep = [i for i, q in enumerate(queries["id"]) if q in qrels]
    queries = {k: [v[i] for i in keep] for k, v in queries.items()}
    return RetrievalSplitData(
        corpus=Dataset.from_dict(corpus), queries=Dataset.from_dict(queries), relevant_docs=qrels, top_ranked=None
    )


def reranking_split(columns: dict[str, list], split: str) -> dict:
    """Reranking rows (query, positive list, negative list) -> mteb's retrieval split with each query's
    candidates as its top-ranked list (positives relevance 1, negatives 0), with the document ids mteb
    gives the same rows (`AbsTaskReranking`: positives first)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    corpus, queries, qrels, top_ranked = [], [], {}, {}
    for i, (query, positives, negatives) in enumerate(zip(columns["query"], columns["positive"], columns["negative"])):
        query_id = f"{split}_query{i}"
        queries.append({"id": query_id, "text": query})
        qrels[query_id], top_ranked[query_id] = {}, []
        for kind, docs, relevance in (("apositive", positives, 1), ("negative", negatives, 0)):
            for j, doc in enumerate(docs):
                doc_id = f"{kind}_{query_id}_{j:05d}"
                corpus.append({"id": doc_id, "title": "", "text": doc})
                qrels[query_id][doc_id] = relevance
                top_ranked[query_id].append(doc_id)
    return RetrievalSplitData(
        corpus=Dataset.from_list(corpus), queries=Dataset.from_list(queries), relevant_docs=qrels, top_ranked=top_ranked
    )

"""Task folders in the MTEB layout as `mteb` tasks, evaluated by mteb's own task code.

A task folder holds its data and a `meta.json` with `type` (one of TASK_TYPES), optionally `eval_split`
(default "test"), `subset` (the hf subset of a multilingual mteb task, e.g. "en"), `main_score`, and
`min_score`/`max_score` for STS and Summarization. The folder name is the task name. Layouts:

- STS: `<split>.jsonl` rows `sentence1`, `sentence2`, `score`;
- Classification: `<split>.jsonl` rows `text`, `label` (and the train split the classifier learns on);
- Retrieval: BEIR's layout: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`),
  `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, with a header);
- Reranking: `<split>.jsonl` rows `query`, `positive` (list), `negative` (list);
- PairClassification: `<split>.jsonl` rows `sentence1`, `sentence2`, `label` (0/1);
- Clustering: `<split>.jsonl` rows `sentences` (list), `labels` (list): one clustering per row;
- Summarization: `<split>.jsonl` rows `text`, `human_summaries` (list), `machine_summaries` (list),
  `relevance` (list of floats, one per machine summary), as in MTEB's SummEval.

- A name mteb knows (STSBenchmark, Banking77Classification, SciFact, SummEval, ...) becomes a subclass
  of mteb's OWN task class (`type(mteb.get_task(name))`) that overrides only the data loading: the
  protocol stays mteb's (samples_per_label, n_experiments, classifier, seed, k values, score
  normalisation). Copying only the metadata into a generic task silently uses samples_per_label 8 and
  loses 4-8 points (see LOG.md).
- Any other name becomes a generic task of its `type` (`AbsTaskSTS`, `AbsTaskClassification`,
  `AbsTaskRetrieval`, `AbsTaskPairClassification`, `AbsTaskClusteringLegacy`, `AbsTaskSummarization`),
  described by its meta.json, so a new folder of any of these layouts needs no code change.

    tasks = load_tasks("data/mteb")                       # every task folder under data/mteb
    tasks = load_tasks("data/mteb", ["STSBenchmark"])     # some of them
    mteb.evaluate(model, tasks, cache=None)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gist.data.records import DataError, iter_records
from gist.evaluation.retrieval_data import read_retrieval, reranking_split

TASK_TYPES = ("STS", "Classification", "Retrieval", "Reranking", "PairClassification", "Clustering", "Summarization")
DEFAULT_MAIN_SCORE = {
    "STS": "cosine_spearman",
    "Classification": "accuracy",
    "Retrieval": "ndcg_at_10",
    "Reranking": "map_at_1000",
    "PairClassification": "max_ap",
    "Clustering": "v_measure",
    "Summarization": "cosine_spearman",
}
TEXTS = list  # a column holding a list (of the types given beside it)
# Columns a `<split>.jsonl` row must have, and their types, per task type (Retrieval: see read_retrieval).
COLUMNS = {
    "STS": {"sentence1": str, "sentence2": str, "score": (int, float)},
    "Classification": {"text": str, "label": (int, str)},
    "Reranking": {"query": str, "positive": (TEXTS, str), "negative": (TEXTS, str)},
    "PairClassification": {"sentence1": str, "sentence2": str, "label": int},
    "Clustering": {"sentences": (TEXTS, str), "labels": (TEXTS, (int, str))},
    "Summarization": {
        "text": str,
        "human_summaries": (TEXTS, str),
        "machine_summaries": (TEXTS, str),
        "relevance": (TEXTS, (int, float)),
    },
}
# Our column name -> the column mteb's task reads.
RENAME = {"PairClassification": {"label": "labels"}}


def is_task_dir(path: Path) -> bool:
    return path.is_dir() and (path / "meta.json").is_file()


def task_dirs(data_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Task folders under `data_dir` (those with a meta.json), sorted; `names` picks some, in that order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: not a folder of task folders")
    found = {p.name: p for p in sorted(data_dir.iterdir()) if is_task_dir(p)}
    if names is None:
        if not found:
            raise FileNotFoundError(f"{data_dir}: no task folders (sub-folders with a meta.json)")
        return list(found.values())
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"{data_dir}: no task folder {missing} (found: {sorted(found)})")
    return [found[n] for n in names]


def read_meta(task_dir: Path) -> dict:
    path = task_dir / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read task metadata: {err}") from None
    if meta.get("type") not in TASK_TYPES:
        raise DataError(f"{path}: 'type' must be one of {TASK_TYPES}, got {meta.get('type')!r}")
    return meta


def eval_split(task_dir: Path, meta: dict | None = None) -> str:
    return (meta or read_meta(task_dir)).get("eval_split", "test")


def split_files(task_dir: Path, split: str, task_type: str) -> list[Path]:
    """The files one split of a task reads."""
    if task_type == "Retrieval":
        return [task_dir / "corpus.jsonl", task_dir / "queries.jsonl", task_dir / "qrels" / f"{split}.tsv"]
    return [task_dir / f"{split}.jsonl"]


def data_digest(task_dir: Path, splits: list[str], task_type: str | None = None) -> str:
    """Content hash of a task's split files and meta.json: results follow the data, not the path."""
    task_type = task_type or read_meta(task_dir)["type"]
    files = [
        task_dir / "meta.json",
        *dict.fromkeys(f for s in sorted(splits) for f in split_files(task_dir, s, task_type)),
    ]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(task_dir)).encode())
        with path.open("rb") as f:  # in chunks: a retrieval corpus can be large
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _check_type(value, types) -> bool:
    if isinstance(types, tuple) and types and types[0] is TEXTS:
        return isinstance(value, list) and all(_check_type(v, types[1]) for v in value)
    return isinstance(value, types) and not isinstance(value, bool)


def read_split(task_dir: Path, split: str, task_type: str) -> dict[str, list]:
    """Columns of one split, validated; the row order is kept (mteb's classifier sampling depends on it)."""
    path = task_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: split file not found (task {task_dir.name} needs split {split!r})")
    columns = COLUMNS[task_type]
    out: dict[str, list] = {c: [] for c in columns}
    for row_no, record in iter_records(path):
        where = f"{path}: row {row_no}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for column, types in columns.items():
            if column not in record:
                raise DataError(f"{where}: missing column {column!r} ({task_type} rows need {sorted(columns)})")
            value = record[column]
            if not _check_type(value, types):
                described = (
                    "a list of the expected type" if isinstance(types, tuple) and types[0] is TEXTS else "another type"
                )
                raise DataError(f"{where}: column {column!r} has type {type(value).__name__} ({described} expected)")
            out[column].append(value)
        _check_row(task_type, record, where)
    if not out[next(iter(columns))]:
        raise DataError(f"{path}: no rows")
    return out


def _check_row(task_type: str, record: dict, where: str) -> None:
    """What the column types cannot say: labels 0/1, one relevance per machine summary, aligned lists."""
    if task_type == "PairClassification" and record["label"] not in (0, 1):
        raise DataError(f"{where}: column 'label' must be 0 or 1, got {record['label']!r}")
    if task_type == "Summarization" and len(record["relevance"]) != len(record["machine_summaries"]):
        raise DataError(f"{where}: 'relevance' needs one score per machine summary")
    if task_type == "Clustering" and len(record["sentences"]) != len(record["labels"]):
        raise DataError(f"{where}: 'sentences' and 'labels' differ in length")
    if task_type == "Reranking" and not (record["positive"] and record["negative"]):
        raise DataError(f"{where}: a reranking row needs at least one positive and one negative")


class _ColumnsAsLists:
    """A `datasets.Dataset` view whose `ds["column"]` is a plain list; everything else is the dataset's.

    datasets >= 4 returns a lazy `Column` for `ds["column"]`, and every `column[i]` re-reads Arrow.
    mteb 2.26's classification indexes the train labels one by one while sampling and hands the label
    columns to sklearn, which iterates them element by element: with datasets 5 that costs about 5 min
    for the four shipped classification tasks, more than the encoding (LOG.md). Same values, same order.
    """

    def __init__(self, dataset) -> None:
        self._dataset = dataset
        self._columns: dict[str, list] = {}

    def __getitem__(self, key):
        if not isinstance(key, str):
            return self._dataset[key]
        if key not in self._columns:
            self._columns[key] = self._dataset.with_format("arrow")[key].to_pylist()
        return self._columns[key]

    def __getattr__(self, name: str):
        return getattr(self._dataset, name)

    def __len__(self) -> int:
        return len(self._dataset)


class _FastColumns:
    """Mixin for mteb classification tasks: their per-experiment steps see `_ColumnsAsLists` views.
    Only how columns are read changes; sampling, classifier and scores are mteb's own code."""

    def _undersample_data(self, dataset, experiment_num, idxs=None):
        return super()._undersample_data(_ColumnsAsLists(dataset), experiment_num, idxs)

    def _run_experiment(self, train_split, eval_split, train_embeddings, test_embeddings, timer):
        return super()._run_experiment(
            _ColumnsAsLists(train_split), _ColumnsAsLists(eval_split), train_embeddings, test_embeddings, timer=timer
        )


class _LocalData:
    """Mixin: mteb's task, with its data read from `task_dir` instead of the Hugging Face hub."""

    task_dir: Path

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        from datasets import Dataset, DatasetDict

        if self.data_loaded:
            return
        task_type = self.metadata.type
        if task_type in ("Retrieval", "Reranking"):
            # mteb's retrieval tasks hold {subset: {split: RetrievalSplitData}}, whatever the language count.
            if task_type == "Retrieval":
                splits = {s: read_retrieval(self.task_dir, s) for s in self.eval_splits}
            else:
                splits = {s: reranking_split(read_split(self.task_dir, s, task_type), s) for s in self.eval_splits}
            self.dataset = {subset: splits for subset in self.hf_subsets}
            self.data_loaded = True
            return
        rename = RENAME.get(task_type, {})
        data = DatasetDict(
            {
                s: Dataset.from_dict({rename.get(k, k): v for k, v in read_split(self.task_dir, s, task_type).items()})
                for s in self.data_splits()
            }
        )
        # Multilingual mteb tasks hold {subset: DatasetDict}; the folder holds one subset (meta "subset").
        self.dataset = {s: data for s in self.hf_subsets} if self.metadata.is_multilingual else data
        self.dataset_transform(num_proc=num_proc)
        self.data_loaded = True

    def data_splits(self) -> list[str]:
        """The splits the evaluation reads: eval splits, plus the classifier's train split."""
        extra = [self.train_split] if self.metadata.type == "Classification" else []
        return list(dict.fromkeys([*self.eval_splits, *extra]))


CATEGORY = {"Classification": "t2c", "Clustering": "t2c"}  # the rest compare texts with texts: "t2t"


def _generic_base(task_type: str) -> type:
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.text.summarization import AbsTaskSummarization

    return {
        "STS": AbsTaskSTS,
        "Classification": AbsTaskClassification,
        "Retrieval": AbsTaskRetrieval,
        "Reranking": AbsTaskRetrieval,
        "PairClassification": AbsTaskPairClassification,
        "Clustering": AbsTaskClusteringLegacy,
        "Summarization": AbsTaskSummarization,
    }[task_type]


def needed_splits(meta: dict, split: str) -> list[str]:
    return [split, "train"] if meta["type"] == "Classification" else [split]


def _generic_class(task_dir: Path, meta: dict, split: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    task_type = meta["type"]
    metadata = TaskMetadata(
        name=task_dir.name,
        description=f"Local task folder {task_dir}",
        # The data digest stands in for the dataset revision: results record which data they came from.
        dataset={"path": str(task_dir), "revision": data_digest(task_dir, needed_splits(meta, split), task_type)},
        type=task_type,
        category=CATEGORY.get(task_type, "t2t"),
        modalities=["text"],
        eval_splits=[split],
        eval_langs=meta.get("eval_langs", ["eng-Latn"]),
        main_score=meta.get("main_score", DEFAULT_MAIN_SCORE[task_type]),
    )
    attrs = {"metadata": metadata, "__module__": __name__}
    if task_type == "STS":
        attrs.update(min_score=meta.get("min_score", 0), max_score=meta.get("max_score", 5))
    elif task_type == "Summarization":
        attrs.update(min_score=meta.get("min_score", 0), max_score=meta.get("max_score", 5))
    elif task_type == "Classification":
        # mteb's default protocol unless the folder says otherwise.
        attrs.update({k: meta[k] for k in ("samples_per_label", "n_experiments") if k in meta})
    return type(task_dir.name, (_generic_base(task_type),), attrs)


def local_task(task_dir: str | Path):
    """The mteb task of one task folder: mteb's own class when it knows the name, else a generic one."""
    import mteb

    task_dir = Path(task_dir)
    meta = read_meta(task_dir)
    split = eval_split(task_dir, meta)
    for needed in needed_splits(meta, split):
        for path in split_files(task_dir, needed, meta["type"]):
            if not path.is_file():
                raise DataError(
                    f"{path}: file not found (a {meta['type']} task needs "
                    f"{'corpus.jsonl, queries.jsonl and qrels/<split>.tsv for ' if meta['type'] == 'Retrieval' else ''}"
                    f"its eval split{' and train split' if needed == 'train' else ''})"
                )
    try:
        known = mteb.get_task(task_dir.name)
    except KeyError:
        known = None
    if known is not None and known.metadata.type != meta["type"]:
        raise DataError(
            f"{task_dir / 'meta.json'}: type {meta['type']!r}, but mteb's {task_dir.name} is {known.metadata.type!r}"
        )
    base = type(known) if known is not None else _generic_class(task_dir, meta, split)
    cls = type(
        base.__name__,
        (_LocalData, *_speedups(base), base),
        {"task_dir": task_dir, "protocol_class": base, "__module__": __name__},
    )
    task = cls()
    if known is not None and meta.get("subset"):
        if meta["subset"] not in task.hf_subsets:
            raise DataError(
                f"{task_dir / 'meta.json'}: subset {meta['subset']!r} is not one of mteb's {task.hf_subsets}"
            )
        task.hf_subsets = [meta["subset"]]
    return task.filter_eval_splits([split])


def _speedups(base: type) -> tuple[type, ...]:
    from mteb.abstasks.classification import AbsTaskClassification

    return (_FastColumns,) if issubclass(base, AbsTaskClassification) else ()


def load_tasks(data_dir: str | Path, names: list[str] | None = None) -> list:
    """mteb tasks for the task folders under `data_dir` (all, or those named)."""
    return [local_task(d) for d in task_dirs(data_dir, names)]


def hub_tasks(names: list[str]) -> list:
    """MTEB's own tasks, loading their data from the Hugging Face hub (needs the network)."""
    import mteb

    return [
        type(type(t).__name__, (*_speedups(type(t)), type(t)), {"protocol_class": type(t), "__module__": __name__})()
        for t in mteb.get_tasks(tasks=names)
    ]

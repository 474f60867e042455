"""Train/eval leakage: texts of training files (GIST schema) that also occur in evaluation splits.

Two levels: EXACT (identical strings) and NEAR (identical after `normalize`: Unicode NFKC, lower case,
punctuation and symbols removed, whitespace collapsed, so "Good morning, world!" == "good morning world").
Texts that normalise to nothing (empty, "...") are ignored: they would all collide.

    from gist.data.leakage import find_overlap, eval_texts, training_texts
    report = find_overlap(training_texts(["a.jsonl", "b.parquet"]), eval_texts("data/mteb"))
    report.total_exact, report.total_near, report.tasks["STSBenchmark/test"].examples

CLI: scripts/check_leakage.py. `eval_keys` also lets data pipelines drop evaluation texts before
training on them (gist/data/mining.py `exclude_eval_of`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gist.data.records import DataError, iter_records
from gist.evaluation.tasks import COLUMNS, TEXTS, eval_split, read_meta, split_files, task_dirs

TRAIN_FIELDS = ("query", "pos", "neg")
# The columns holding texts (a string, or a list of strings), per task type; Retrieval: its BEIR files.
TEXT_COLUMNS = {
    task_type: [c for c, t in cols.items() if t is str or t == (TEXTS, str)] for task_type, cols in COLUMNS.items()
}
RETRIEVAL_TEXT_COLUMNS = {"corpus.jsonl": ["title", "text"], "queries.jsonl": ["text"]}


def normalize(text: str) -> str:
    """Lower case, no punctuation/symbols, single spaces: the key of a near-duplicate."""
    text = unicodedata.normalize("NFKC", text).lower()
    # Punctuation and symbols become spaces so "well-known" and "well known" meet.
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Text:
    text: str
    where: str  # "<file>: row N, column C"


def training_texts(paths: Iterable[str | Path]) -> Iterator[Text]:
    """query/pos/neg texts of GIST-schema files (.jsonl/.parquet), validated row by row."""
    for path in map(Path, paths):
        for row_no, record in iter_records(path):
            where = f"{path}: row {row_no}"
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if not any(record.get(f) for f in TRAIN_FIELDS):
                raise DataError(f"{where}: none of the GIST text columns {TRAIN_FIELDS}")
            for column in TRAIN_FIELDS:
                value = record.get(column)
                if value is None or value == "":
                    continue
                if not isinstance(value, str):
                    raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
                yield Text(value, f"{where}, {column}")


def eval_texts(
    data_dir: str | Path, splits: list[str] | None = None, tasks: list[str] | None = None
) -> dict[str, list[Text]]:
    """{"<task>/<split>": texts} of the evaluation splits (each task's eval split unless `splits` is given)."""
    out = {}
    for task_dir in task_dirs(data_dir, tasks):
        meta = read_meta(task_dir)
        for split in splits or [eval_split(task_dir, meta)]:
            files = split_files(task_dir, split, meta["type"])
            if not all(p.is_file() for p in files):
                continue  # e.g. splits=[validation] for a task that has none
            texts = []
            for path in files:
                if path.suffix != ".jsonl":
                    continue  # qrels: ids only
                columns = (
                    RETRIEVAL_TEXT_COLUMNS[path.name] if meta["type"] == "Retrieval" else TEXT_COLUMNS[meta["type"]]
                )
                texts += _texts_of(path, columns, optional={"title"})
            out[f"{task_dir.name}/{split}"] = texts
    return out


def _texts_of(path: Path, columns: list[str], optional: set[str]) -> list[Text]:
    texts = []
    for row_no, record in iter_records(path):
        for column in columns:
            value = record.get(column) if isinstance(record, dict) else None
            if value is None and column in optional:
                continue
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) for v in values):
                raise DataError(f"{path}: row {row_no}: column {column!r} must be a string or a list of strings")
            texts += [Text(v, f"{path}: row {row_no}, {column}") for v in values if v]
    return texts


def eval_keys(data_dir: str | Path, splits: list[str] | None = None) -> set[str]:
    """Normalised texts of the evaluation splits: what training data must not contain."""
    return {k for texts in eval_texts(data_dir, splits).values() for t in texts if (k := normalize(t.text))}


@dataclass
class SplitOverlap:
    eval_texts: int = 0  # distinct normalised texts of the split
    exact: int = 0  # distinct eval texts found verbatim in training
    near: int = 0  # distinct eval texts found only after normalisation
    training_rows: int = 0  # training texts that hit this split
    examples: list[dict] = field(default_factory=list)


@dataclass
class OverlapReport:
    tasks: dict[str, SplitOverlap]
    training_texts: int

    @property
    def total_exact(self) -> int:
        return sum(s.exact for s in self.tasks.values())

    @property
    def total_near(self) -> int:
        return sum(s.near for s in self.tasks.values())

    @property
    def clean(self) -> bool:
        return self.total_exact == 0 and self.total_near == 0

    def as_dict(self) -> dict:
        return {
            "training_texts": self.training_texts,
            "exact": self.total_exact,
            "near": self.total_near,
            "tasks": {k: vars(v) for k, v in self.tasks.items()},
        }


def find_overlap(train: Iterable[Text], evals: dict[str, list[Text]], max_examples: int = 5) -> OverlapReport:
    """Exact and near-duplicate overlap of training texts with each evaluation split.

    Counts are of DISTINCT evaluation texts (by normalised key): exact if some training text equals one
    of its spellings verbatim, near if training only has it after normalisation.
    """
    # Index the (smaller) eval side: key -> split -> (its raw spellings, first occurrence); stream training once.
    index: dict[str, dict[str, tuple[set[str], Text]]] = {}
    report = {name: SplitOverlap() for name in evals}
    for name, texts in evals.items():
        for t in texts:
            key = normalize(t.text)
            if key:
                spellings, _ = index.setdefault(key, {}).setdefault(name, (set(), t))
                spellings.add(t.text)
        report[name].eval_texts = sum(name in splits for splits in index.values())
    exact_hit: dict[tuple[str, str], bool] = {}  # (split, key) -> seen verbatim?
    n_train = 0
    for t in train:
        n_train += 1
        key = normalize(t.text)
        for name, (spellings, first) in (index.get(key) or {}).items():
            split = report[name]
            split.training_rows += 1
            if (name, key) not in exact_hit and len(split.examples) < max_examples:
                split.examples.append(
                    {"eval": first.where, "eval_text": first.text, "train": t.where, "train_text": t.text}
                )
            exact_hit[(name, key)] = exact_hit.get((name, key), False) or t.text in spellings
    for (name, _), exact in exact_hit.items():
        if exact:
            report[name].exact += 1
        else:
            report[name].near += 1
    return OverlapReport(report, n_train)


# --- the command line (scripts/check_leakage.py) ---------------------------------------------------------


def training_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the .jsonl/.parquet files under folders (recursively, sorted); FileNotFoundError
    for a missing input or a folder without such files."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix in (".jsonl", ".parquet") and p.is_file())
            if not found:
                raise FileNotFoundError(f"{item}: no .jsonl or .parquet files")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def report_text(report: OverlapReport, files: int, splits: int) -> str:
    """The report as printed: a table per split, the examples, and the verdict line last."""
    lines = [
        f"{report.training_texts} training texts in {files} files vs {splits} evaluation splits",
        "| split | eval texts | exact | near | training texts hitting it |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {s.eval_texts} | {s.exact} | {s.near} | {s.training_rows} |" for name, s in report.tasks.items()
    ]
    for name, s in report.tasks.items():
        for ex in s.examples:
            lines.append(
                f"  {name}: {ex['eval_text']!r} ({ex['eval']})\n      train: {ex['train_text']!r} ({ex['train']})"
            )
    lines.append("no overlap" if report.clean else f"OVERLAP: {report.total_exact} exact, {report.total_near} near")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """scripts/check_leakage.py: print the report (and write it as JSON with --output); exit status 1 with
    --fail-on-overlap when anything overlaps."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(
        description="Report texts shared by training files (GIST schema) and evaluation splits."
    )
    parser.add_argument("train", nargs="+", help="training files or folders (GIST schema: query, pos, neg)")
    parser.add_argument("--data-dir", required=True, help="folder of task folders (e.g. data/mteb)")
    parser.add_argument("--tasks", nargs="*", default=None, help="task folder names (default: all)")
    parser.add_argument("--splits", nargs="*", default=None, help="splits to check (default: each task's eval split)")
    parser.add_argument("--examples", type=int, default=3, help="examples shown per split")
    parser.add_argument("--output", help="write the full report as JSON here")
    parser.add_argument("--fail-on-overlap", action="store_true", help="exit 1 if any text overlaps")
    args = parser.parse_args(argv)

    try:
        files = training_files(args.train)
    except FileNotFoundError as err:
        sys.exit(str(err))
    evals = eval_texts(args.data_dir, args.splits, args.tasks)
    report = find_overlap(training_texts(files), evals, max_examples=args.examples)
    print(report_text(report, len(files), len(evals)))
    if args.output:
        Path(args.output).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return 1 if args.fail_on_overlap and not report.clean else 0

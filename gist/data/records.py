"""Training rows in the GIST/MEDI schema: reading and validation (the bottom layer of gist.data).

Schema (avsolatorio/medi-data-mteb_avs_triplets): query, pos, neg, task_name, query_instruct,
pos_instruct, neg_instruct, symmetric. `neg` may be empty/absent for pair tasks (then the batch has
no hard negatives; a task must be consistent). Sources: local `.jsonl`/`.json` (one object per line)
or `.parquet` files, or a hub dataset id + revision (`HubDataset`) streamed with `datasets`.

    skipped = Counter()  # reason -> bad rows left out (on_bad_row="skip")
    for row in iter_rows([Path("train.jsonl"), HubDataset("org/data", "abc123")], on_bad_row="skip", skipped=skipped):
        ...  # {query, pos, neg (str | None), task_name, symmetric, instruct, where ("source: row N")}
    rows_per_task = validate_sources(paths)  # read every row once before training, or raise DataError

Also here: `read_sts` (an STS split for validation) and `text_id` (the stable id of a text). Built on
this module: gist.data.sources (source specs and mixing), gist.data.batching (same-task batches, sharding,
resume), gist.data.collate (rows -> typed training / validation batches).

Bad input (`on_bad_row`): "error" (default) raises `DataError` naming the source, the row and the
problem; "skip" drops the row and counts it under its reason (`BAD_ROW_REASONS`) in a caller's Counter.
Whole-source faults (a missing or unreadable file, an unknown hub dataset or revision) always raise.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_FIELDS = ("query", "pos", "neg")
INSTRUCT = {"query": "query_instruct", "pos": "pos_instruct", "neg": "neg_instruct"}
BLOCKS = {"query": "anchor", "pos": "positive", "neg": "negative"}


BAD_ROW_REASONS = (
    "malformed_json",
    "invalid_utf8",
    "not_an_object",
    "missing_column",
    "wrong_type",
    "empty_text",
    "inconsistent_negatives",
    "single_row_task",
)
ON_BAD_ROW = ("error", "skip")


class DataError(ValueError):
    """A bad training row or source; the message names the source, row and problem. `reason` is one
    of BAD_ROW_REASONS for a row-level fault, None for a source-level one (never skipped)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"data.on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")


@dataclass(frozen=True)
class HubDataset:
    """A hub dataset streamed with `datasets` (revision pinned for reproducibility)."""

    path: str
    revision: str | None = None
    split: str = "train"
    name: str | None = None

    def __str__(self) -> str:
        return f"hub dataset {self.path}@{self.revision or 'main'} ({self.split})"


Source = Path | HubDataset


def _unreadable(path: Path, err: Exception) -> DataError:
    return DataError(f"{path}: cannot be read: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record | DataError): a bad line is yielded as its error so a caller may skip it."""
    try:
        f = path.open("rb")
    except OSError as err:
        raise _unreadable(path, err) from None
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except OSError as err:
                raise _unreadable(path, err) from None
            if not raw:
                return
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    lineno,
                    DataError(
                        f"{path}: row {lineno}: invalid UTF-8 ({err.reason} at byte {err.start})", "invalid_utf8"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield (
                    lineno,
                    DataError(
                        f"{path}: row {lineno}: malformed JSON: {err.msg} (column {err.colno})", "malformed_json"
                    ),
                )
                continue
            yield lineno, record


def _iter_parquet(path: Path) -> Iterator[tuple[int, object]]:
    """Row group by row group (memory: one row group, converted to Python 2,048 rows at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(path) as f:
            for group in range(f.num_row_groups):
                table = f.read_row_group(group)
                for batch in table.to_batches(max_chunksize=2048):
                    for record in batch.to_pylist():
                        yield row, record
                        row += 1
                del table
    except (OSError, pa.ArrowException) as err:  # not parquet, truncated, unreadable
        raise DataError(
            f"{path}: cannot be read as parquet (after row {row - 1 if row else 'none'}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def _iter_hub(source: HubDataset) -> Iterator[tuple[int, object]]:
    stream = open_hub_dataset(source)
    yield from enumerate(stream)


def open_hub_dataset(source: HubDataset):
    """Open a streamed hub dataset, or fail at once with a message that says what to do."""
    import datasets

    try:
        return datasets.load_dataset(
            source.path, source.name, revision=source.revision, split=source.split, streaming=True
        )
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise DataError(
            f"{source}: cannot be opened: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            "  - With hub access: unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and check the id and revision.\n"
            "  - Without: download its parquet files elsewhere (`hf download --repo-type dataset "
            f"{source.path}{' --revision ' + source.revision if source.revision else ''}`) and train from "
            "them with data.train_files=[...]."
        ) from err


def iter_records(source: Source, skipped: Counter | None = None) -> Iterator[tuple[int, object]]:
    """(row number, raw record) of one source, streamed. A line that is not JSON / not UTF-8 raises
    DataError, or with a `skipped` Counter is counted under its reason and left out."""
    if isinstance(source, HubDataset):
        records = _iter_hub(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: training file not found (or not a file)")
        if path.suffix == ".parquet":
            records = _iter_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            records = _iter_jsonl(path)
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")
    for row_no, record in records:
        if isinstance(record, DataError):
            if skipped is None:
                raise record
            skipped[record.reason] += 1
            continue
        yield row_no, record


def _text(record: dict, field: str, where: str, required: bool) -> str | None:
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip() and not required):
        if required:
            raise DataError(f"{where}: missing column {field!r}", "missing_column")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: column {field!r} must be a string, got {type(value).__name__}", "wrong_type")
    if not value.strip():
        raise DataError(f"{where}: column {field!r} is empty or whitespace-only", "empty_text")
    return value


def parse_row(record: object, where: str) -> dict:
    """Validate one raw record and return {query, pos, neg (str|None), task_name, symmetric, instruct}.
    `instruct` maps query/pos/neg to the row's *_instruct ("" when absent): each encoder decides whether
    and how to use them (its `instructions`, gist.core.inputs)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}", "not_an_object")
    row = {field: _text(record, field, where, required=field != "neg") for field in TEXT_FIELDS}
    row["task_name"] = _text(record, "task_name", where, required=True)
    symmetric = record.get("symmetric", False)
    if symmetric is not None and not isinstance(symmetric, bool):
        raise DataError(f"{where}: column 'symmetric' must be a boolean, got {type(symmetric).__name__}", "wrong_type")
    row["symmetric"] = bool(symmetric)
    instruct = {}
    for field in TEXT_FIELDS:
        value = record.get(INSTRUCT[field])
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"{where}: column {INSTRUCT[field]!r} must be a string, got {type(value).__name__}", "wrong_type"
            )
        instruct[field] = value or ""
    row["instruct"] = instruct
    return row


def iter_rows(
    sources: Iterable[Source],
    on_bad_row: str = "error",
    skipped: Counter | None = None,
) -> Iterator[dict]:
    """Validated rows of all sources in order; each carries `where` ("source: row N") for errors.

    A task must either always or never have a hard negative (its batches are stacked); a row that
    breaks this is bad. on_bad_row="skip" leaves bad rows out, counted per reason in `skipped`."""
    _check_on_bad_row(on_bad_row)
    skip = on_bad_row == "skip"
    skipped = skipped if skipped is not None else Counter()
    has_neg: dict[str, tuple[bool, str]] = {}
    for source in sources:
        for row_no, record in iter_records(source, skipped if skip else None):
            where = f"{source}: row {row_no}"
            try:
                row = parse_row(record, where)
                first = has_neg.setdefault(row["task_name"], (row["neg"] is not None, where))
                if first[0] != (row["neg"] is not None):
                    raise DataError(
                        f"{where}: task {row['task_name']!r} {'lacks' if first[0] else 'has'} a 'neg' but its first "
                        f"row ({first[1]}) {'has' if first[0] else 'lacks'} one; a task must be consistent",
                        "inconsistent_negatives",
                    )
            except DataError as err:
                if not skip:
                    raise
                skipped[err.reason] += 1
                continue
            row["where"] = where
            yield row


def validate_sources(
    sources: Iterable[Source], on_bad_row: str = "error", skipped: Counter | None = None
) -> dict[str, int]:
    """Read every row once (before training) so a bad row stops the run early. Returns rows per task.

    A task with a single row can never form a same-task batch (in-batch negatives need >= 2 rows): an
    error naming its row, or under on_bad_row="skip" counted as "single_row_task" (the stream drops it
    anyway: it never fills a batch)."""
    counts: dict[str, int] = {}
    first_row: dict[str, str] = {}
    for row in iter_rows(sources, on_bad_row=on_bad_row, skipped=skipped):
        counts[row["task_name"]] = counts.get(row["task_name"], 0) + 1
        first_row.setdefault(row["task_name"], row["where"])
    for task in [t for t, n in counts.items() if n == 1]:
        if on_bad_row != "skip":
            raise DataError(
                f"{first_row[task]}: task {task!r} has only this one row; a same-task batch needs at least 2 "
                "(add rows, drop the task, or set data.on_bad_row=skip)",
                "single_row_task",
            )
        if skipped is not None:
            skipped["single_row_task"] += 1
        del counts[task]
    return counts


def read_sts(task_dir: str | Path, split: str) -> tuple[list[str], list[str], list[float]]:
    """sentence1, sentence2, score of an STS task folder in the MTEB layout (`<split>.jsonl`)."""
    path = Path(task_dir) / f"{split}.jsonl"
    s1, s2, scores = [], [], []
    for row_no, record in iter_records(path):
        where = f"{path}: row {row_no}"
        if not isinstance(record, dict) or not all(k in record for k in ("sentence1", "sentence2", "score")):
            raise DataError(f"{where}: an STS row needs sentence1, sentence2 and score")
        s1.append(str(record["sentence1"]))
        s2.append(str(record["sentence2"]))
        scores.append(float(record["score"]))
    return s1, s2, scores


def text_id(text: str) -> int:
    """A stable 63-bit id of a raw string (equal text <=> equal id, up to hash collisions)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1

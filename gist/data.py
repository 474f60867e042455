"""Training rows in the GIST/MEDI schema: reading, validation, same-task batching and collation.

Schema (avsolatorio/medi-data-mteb_avs_triplets): query, pos, neg, task_name, query_instruct,
pos_instruct, neg_instruct, symmetric. `neg` may be empty/absent for pair tasks (then the batch has
no hard negatives; a task must be consistent). Sources: local `.jsonl`/`.json` (one object per line)
or `.parquet` files, or a hub dataset id + revision streamed with `datasets`.

Same-task batches (GIST_SPEC §2): rows go into a buffer per task_name in stream order; a full buffer
becomes a batch (so every batch holds ONE task, whether the task's rows are contiguous or scattered);
batches pass through a seeded shuffle pool of `shuffle_buffer` batches. Leftovers (< batch_size rows
of a task at the end of an epoch) are dropped, as GIST drops chunks that span two tasks.

Bad input (`on_bad_row`): "error" (default) raises `DataError` naming the source, the row and the
problem; "skip" drops the row and counts it under its reason (`BAD_ROW_REASONS`) in a caller's Counter.
Whole-source faults (a missing or unreadable file, an unknown hub dataset or revision) always raise.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

TEXT_FIELDS = ("query", "pos", "neg")
INSTRUCT = {"query": "query_instruct", "pos": "pos_instruct", "neg": "neg_instruct"}
BLOCKS = {"query": "anchor", "pos": "positive", "neg": "negative"}


BAD_ROW_REASONS = (
    "malformed_json", "invalid_utf8", "not_an_object", "missing_column", "wrong_type", "empty_text",
    "inconsistent_negatives", "single_row_task",
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
                yield lineno, DataError(
                    f"{path}: row {lineno}: invalid UTF-8 ({err.reason} at byte {err.start})", "invalid_utf8"
                )
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, DataError(f"{path}: row {lineno}: malformed JSON: {err.msg} (column {err.colno})", "malformed_json")
                continue
            yield lineno, record


def _iter_parquet(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
            for record in batch.to_pylist():
                yield row, record
                row += 1
    except (OSError, pa.ArrowException) as err:  # not parquet, truncated, unreadable
        raise DataError(f"{path}: cannot be read as parquet (after row {row - 1 if row else 'none'}): "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def _iter_hub(source: HubDataset) -> Iterator[tuple[int, object]]:
    stream = open_hub_dataset(source)
    for row, record in enumerate(stream):
        yield row, record


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


def parse_row(record: object, where: str, prepend_instructions: bool = False) -> dict:
    """Validate one raw record and return {query, pos, neg (str|None), task_name, symmetric}."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}", "not_an_object")
    row = {field: _text(record, field, where, required=field != "neg") for field in TEXT_FIELDS}
    row["task_name"] = _text(record, "task_name", where, required=True)
    symmetric = record.get("symmetric", False)
    if symmetric is not None and not isinstance(symmetric, bool):
        raise DataError(f"{where}: column 'symmetric' must be a boolean, got {type(symmetric).__name__}", "wrong_type")
    row["symmetric"] = bool(symmetric)
    if prepend_instructions:
        for field in TEXT_FIELDS:
            instruct = record.get(INSTRUCT[field])
            if row[field] is not None and isinstance(instruct, str) and instruct.strip():
                sep = "" if instruct[-1].isspace() else " "
                row[field] = f"{instruct}{sep}{row[field]}"
    return row


def iter_rows(
    sources: Iterable[Source],
    prepend_instructions: bool = False,
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
                row = parse_row(record, where, prepend_instructions)
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


def validate_sources(sources: Iterable[Source], on_bad_row: str = "error", skipped: Counter | None = None) -> dict[str, int]:
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
                "(add rows, drop the task, or set data.on_bad_row=skip)", "single_row_task"
            )
        if skipped is not None:
            skipped["single_row_task"] += 1
        del counts[task]
    return counts


def _shard() -> tuple[int, int]:
    """(index, count) of this reader among all DDP ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info else (1, 0)
    return rank * workers + worker, world * workers


class SameTaskBatches(IterableDataset):
    """Streams lists of `batch_size` rows, all of one task, in a seeded order that changes per epoch.

    Batches are dealt round-robin to DDP ranks and DataLoader workers (each sees distinct batches).
    """

    def __init__(
        self,
        sources: list[Source],
        batch_size: int,
        seed: int = 42,
        shuffle_buffer: int = 1024,
        prepend_instructions: bool = False,
        on_bad_row: str = "error",
    ) -> None:
        _check_on_bad_row(on_bad_row)
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got {batch_size}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 batch, got {shuffle_buffer}")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.prepend_instructions = prepend_instructions
        self.on_bad_row = on_bad_row  # bad rows were counted by the datamodule's pre-training pass
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> Iterator[list[dict]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        buffers: dict[str, list[dict]] = {}
        pool: list[list[dict]] = []
        for row in iter_rows(self.sources, self.prepend_instructions, on_bad_row=self.on_bad_row):
            buf = buffers.setdefault(row["task_name"], [])
            buf.append(row)
            if len(buf) == self.batch_size:
                pool.append(buf)
                buffers[row["task_name"]] = []
                if len(pool) >= self.shuffle_buffer:
                    yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        yield from pool

    def __iter__(self) -> Iterator[list[dict]]:
        shard, shards = _shard()
        for i, batch in enumerate(self._batches()):
            if i % shards == shard:
                yield batch


def text_id(text: str) -> int:
    """A stable 63-bit id of a raw string (equal text <=> equal id, up to hash collisions)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class Collator:
    """Rows of one batch -> tokenized student inputs, text ids, and for the guide either its cached
    embeddings (when a `GuideCache` holds every text of the batch) or inputs tokenized from the raw
    strings with the guide's OWN tokenizer. Holds tokenizers and the cache's path only, so DataLoader
    workers can pickle it.
    """

    def __init__(
        self,
        student_tokenizer,
        student_max_length: int,
        guide_tokenizer=None,
        guide_max_length: int | None = None,
        guide_cache=None,
    ):
        self.student = (student_tokenizer, student_max_length)
        self.guide = (guide_tokenizer, guide_max_length) if guide_tokenizer is not None else None
        self.guide_cache = guide_cache

    @staticmethod
    def _tokenize(tok, max_length: int, texts: list[str]):
        return dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    def _cached_guide(self, text_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if self.guide_cache is None:
            return None
        for attempt in range(2):
            out = {k: self.guide_cache.lookup(v) for k, v in text_ids.items()}
            if all(v is not None for v in out.values()):
                return out
            if attempt == 0:
                self.guide_cache.refresh()  # another process (the trainer, a rank) may have added segments
        return None

    def __call__(self, rows: list[dict]) -> dict:
        texts = {BLOCKS[f]: [r[f] for r in rows] for f in TEXT_FIELDS if rows[0][f] is not None}
        text_ids = {k: torch.tensor([text_id(t) for t in v]) for k, v in texts.items()}
        batch = {
            "task": rows[0]["task_name"],
            "size": len(rows),
            "texts": texts,
            "text_ids": text_ids,
            "student": {k: self._tokenize(*self.student, v) for k, v in texts.items()},
            "guide": None,
            "guide_emb": None,
        }
        if self.guide is not None:
            batch["guide_emb"] = self._cached_guide(text_ids)
            if batch["guide_emb"] is None:
                batch["guide"] = {k: self._tokenize(*self.guide, v) for k, v in texts.items()}
        return batch


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


class StsCollator:
    """(sentence1, sentence2, score) rows -> student inputs for both sides and the gold scores."""

    def __init__(self, tokenizer, max_length: int):
        self.student = (tokenizer, max_length)

    def __call__(self, rows: list[tuple[str, str, float]]) -> dict:
        s1, s2, score = zip(*rows)
        return {
            "sentence1": Collator._tokenize(*self.student, list(s1)),
            "sentence2": Collator._tokenize(*self.student, list(s2)),
            "score": torch.tensor(score, dtype=torch.float32),
        }

"""Training rows in the GIST/MEDI schema: reading, validation, same-task batching and collation.

Schema (avsolatorio/medi-data-mteb_avs_triplets): query, pos, neg, task_name, query_instruct,
pos_instruct, neg_instruct, symmetric. `neg` may be empty/absent for pair tasks (then the batch has
no hard negatives; a task must be consistent). Sources: local `.jsonl`/`.json` (one object per line)
or `.parquet` files, or a hub dataset id + revision streamed with `datasets`.

Same-task batches (GIST_SPEC §2): rows go into a buffer per task_name in stream order; a full buffer
becomes a batch (so every batch holds ONE task, whether the task's rows are contiguous or scattered);
batches pass through a seeded shuffle pool of `shuffle_buffer` batches. Leftovers (< batch_size rows
of a task at the end of an epoch) are dropped by default, as GIST drops chunks that span two tasks.
Under DDP the buffers fill GLOBAL batches (batch_size x world_size rows) that are split across ranks;
several sources can be mixed by weight or temperature; the stream position can be saved and resumed
exactly. See `SameTaskBatches` for the policies and memory bound.

Bad input (`on_bad_row`): "error" (default) raises `DataError` naming the source, the row and the
problem; "skip" drops the row and counts it under its reason (`BAD_ROW_REASONS`) in a caller's Counter.
Whole-source faults (a missing or unreadable file, an unknown hub dataset or revision) always raise.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
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

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class SourceSpec:
    """One source of the training mixture.

    weight: relative probability of drawing the next row from this source (all sources weighted, or none).
    max_rows: use only the first `max_rows` rows of the source (a prefix: the stream is never read past it).
    rows: the source's row count, for temperature sampling where it cannot be read cheaply (hub datasets).
    """

    source: Source
    weight: float | None = None
    max_rows: int | None = None
    rows: int | None = None

    def __post_init__(self) -> None:
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"{self.source}: weight must be > 0, got {self.weight}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"{self.source}: max_rows must be >= 1, got {self.max_rows}")
        if self.rows is not None and self.rows < 0:
            raise ValueError(f"{self.source}: rows must be >= 0, got {self.rows}")

    def __str__(self) -> str:
        return str(self.source)


def source_spec(entry: object) -> SourceSpec:
    """A SourceSpec from a path, a HubDataset, or a Hydra dict {path: file} / {hub: id, revision, split,
    name} plus optional weight, max_rows, rows."""
    if isinstance(entry, SourceSpec):
        return entry
    if isinstance(entry, HubDataset):
        return SourceSpec(entry)
    if isinstance(entry, (str, Path)):
        return SourceSpec(Path(entry))
    entry = dict(entry)  # a dict or an omegaconf DictConfig
    known = {"path", "hub", "revision", "split", "name", "weight", "max_rows", "rows"}
    if set(entry) - known or ("path" in entry) == ("hub" in entry):
        raise ValueError(
            f"data source {entry}: give exactly one of `path` (a local file) or `hub` (a dataset id, with "
            f"revision/split/name), plus optional weight, max_rows, rows; unknown keys: {sorted(set(entry) - known)}"
        )
    extra = {k: entry[k] for k in ("weight", "max_rows", "rows") if entry.get(k) is not None}
    if "path" in entry:
        return SourceSpec(Path(entry["path"]), **extra)
    hub = {k: entry[k] for k in ("revision", "split", "name") if entry.get(k) is not None}
    return SourceSpec(HubDataset(entry["hub"], **hub), **extra)


def count_rows(source: Source) -> int:
    """Rows of a local source without parsing it (parquet: footer metadata; jsonl: non-blank lines)."""
    if isinstance(source, HubDataset):
        raise DataError(f"{source}: its row count is unknown; give `rows: N` for temperature sampling")
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: training file not found (or not a file)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def mixture_probabilities(specs: list[SourceSpec], temperature: float | None = None) -> list[float] | None:
    """Per-source sampling probabilities: the normalised weights, or p_i ∝ n_i^(1/T) with n_i the source's
    rows (capped by max_rows) when `temperature` T is set; None (sources read one after another) when
    neither is given."""
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and temperature is not None:
        raise ValueError("give either per-source weights or a sampling temperature, not both")
    if any(weighted) and not all(weighted):
        raise ValueError(f"either every source has a weight or none: missing for {[str(s) for s in specs if s.weight is None]}")
    if all(weighted) and specs:
        raw = [float(s.weight) for s in specs]
    elif temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        sizes = [s.rows if s.rows is not None else count_rows(s.source) for s in specs]
        sizes = [min(n, s.max_rows) if s.max_rows is not None else n for n, s in zip(sizes, specs)]
        for n, s in zip(sizes, specs):
            if n == 0:
                raise DataError(f"{s}: no rows")
        raw = [n ** (1.0 / temperature) for n in sizes]
    else:
        return None
    total = sum(raw)
    return [w / total for w in raw]


def _shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """(rank, world size, DataLoader worker, workers) of this reader; rank/world from torch.distributed
    unless given."""
    if rank is None or world_size is None:
        rank, world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank, world_size, worker, workers


class RowBatch(list):
    """The rows of one (per-rank) batch, with its place in the stream: `epoch` and `index`, the number of
    global batches before it in that epoch."""

    def __init__(self, rows: Iterable[dict], epoch: int, index: int) -> None:
        super().__init__(rows)
        self.epoch, self.index = epoch, index


LEFTOVERS = ("drop", "emit")


class SameTaskBatches(IterableDataset):
    """Streams batches of rows that all come from ONE task, in a seeded order that changes per epoch, so
    that every DDP rank trains on the same task in every step.

    Stream: rows are drawn from the sources (one after another, or by mixture probabilities, see
    `mixture_probabilities`) and appended to a buffer per task_name. A buffer that reaches the GLOBAL batch
    size G = batch_size x world_size becomes a global batch, which enters a seeded shuffle pool of
    `shuffle_buffer` global batches; rank r trains on rows [r*batch_size, (r+1)*batch_size) of each.
    Every rank and every DataLoader worker computes the same global sequence from (seed, epoch); worker w
    of W collates (tokenizes) only every W-th batch, and the DataLoader's round-robin over workers puts
    them back in sequence order.

    Memory bound (independent of the data size): partial task buffers hold at most
    tasks x (G - 1) rows (`max_buffered_rows` caps the total: beyond it the buffer of the task that
    received a row least recently is evicted, its rows dropped and counted), plus
    shuffle_buffer x G rows in the pool, plus one parquet row group per open source.
    Leftovers (a task's last < G rows of an epoch): `leftovers="drop"` (default, as GIST) or `"emit"`
    (a smaller batch, trimmed to a multiple of world_size, when it has >= 2 rows per rank).
    Mixture (probabilities given): a source that runs out starts its next pass; the epoch ends once
    every source has been read to its end (or to max_rows) at least once.

    Position: `state_dict()` holds (epoch, next_batch = global batches consumed) and the settings that
    determine the stream; `load_state_dict()` restarts that epoch at that batch by replaying the stream
    without collating (offsets, buffers, pool and RNGs are a deterministic function of those).
    """

    def __init__(
        self,
        sources: list,
        batch_size: int,
        seed: int = 42,
        shuffle_buffer: int = 1024,
        prepend_instructions: bool = False,
        on_bad_row: str = "error",
        temperature: float | None = None,
        leftovers: str = "drop",
        max_buffered_rows: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _check_on_bad_row(on_bad_row)
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got {batch_size}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 batch, got {shuffle_buffer}")
        if leftovers not in LEFTOVERS:
            raise ValueError(f"leftovers must be one of {LEFTOVERS}, got {leftovers!r}")
        if max_buffered_rows is not None and max_buffered_rows < 0:
            raise ValueError(f"max_buffered_rows must be >= 0, got {max_buffered_rows}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"give both rank and world_size (0 <= rank < world_size), got {rank}, {world_size}")
        self.specs = [source_spec(s) for s in sources]
        if not self.specs:
            raise ValueError("no training sources")
        self.sources = [s.source for s in self.specs]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.prepend_instructions = prepend_instructions
        self.on_bad_row = on_bad_row  # bad rows were counted by the datamodule's pre-training pass
        self.temperature = temperature
        self.probabilities = mixture_probabilities(self.specs, temperature)
        self.leftovers = leftovers
        self.max_buffered_rows = max_buffered_rows
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Fixed here, in the rank's process: DataLoader workers started with `spawn` see no process group.
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.next_batch = 0  # global batches of `epoch` consumed (by training) / to skip when iterating
        self.stats: dict[str, int] = {}  # of the last epoch generated in this process

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.next_batch = epoch, 0

    # -- the stream -------------------------------------------------------------------------------------
    def _source_rows(self, spec: SourceSpec) -> Iterator[dict]:
        return itertools.islice(iter_rows([spec.source], self.prepend_instructions, on_bad_row=self.on_bad_row), spec.max_rows)

    def _rows(self, epoch: int) -> Iterator[dict]:
        if self.probabilities is None:
            for spec in self.specs:
                yield from self._source_rows(spec)
            return
        rng = random.Random(f"{self.seed}:{epoch}:mix")
        streams = [self._source_rows(s) for s in self.specs]
        done = [False] * len(self.specs)
        choices = range(len(self.specs))
        while True:
            i = rng.choices(choices, weights=self.probabilities)[0]
            row = next(streams[i], None)
            if row is None:  # end of a pass over source i
                done[i] = True
                if all(done):
                    return
                streams[i] = self._source_rows(self.specs[i])
                row = next(streams[i], None)
                if row is None:
                    raise DataError(f"{self.specs[i]}: no rows")
            yield row

    def global_batches(self, epoch: int, world_size: int = 1) -> Iterator[list[dict]]:
        """The global batches (G = batch_size x world_size rows of one task) of one epoch, in order."""
        size = self.batch_size * world_size
        if self.max_buffered_rows is not None and self.max_buffered_rows < size - 1:
            raise ValueError(f"max_buffered_rows {self.max_buffered_rows} < global batch size - 1 = {size - 1}: no task could fill a batch")
        rng = random.Random(f"{self.seed}:{epoch}")
        buffers: dict[str, list[dict]] = {}  # partial buffers, least recently appended first
        held = 0
        pool: list[list[dict]] = []
        stats = self.stats = {"rows": 0, "batches": 0, "evicted_rows": 0, "leftover_rows": 0, "emitted_leftover_batches": 0,
                                   "peak_buffered_rows": 0}
        for row in self._rows(epoch):
            stats["rows"] += 1
            task = row["task_name"]
            buf = buffers.pop(task, None) or []
            buf.append(row)
            if len(buf) == size:
                held -= size - 1
                pool.append(buf)
                if len(pool) >= self.shuffle_buffer:
                    stats["batches"] += 1
                    yield pool.pop(rng.randrange(len(pool)))
                continue
            buffers[task] = buf
            held += 1
            if self.max_buffered_rows is not None and held > self.max_buffered_rows:
                stale = buffers.pop(next(iter(buffers)))
                held -= len(stale)
                stats["evicted_rows"] += len(stale)
            stats["peak_buffered_rows"] = max(stats["peak_buffered_rows"], held)
        for buf in buffers.values():
            keep = len(buf) // world_size * world_size
            if self.leftovers == "emit" and keep >= 2 * world_size:
                pool.append(buf[:keep])
                stats["emitted_leftover_batches"] += 1
                stats["leftover_rows"] += len(buf) - keep
            else:
                stats["leftover_rows"] += len(buf)
        rng.shuffle(pool)
        stats["batches"] += len(pool)
        yield from pool

    def __iter__(self) -> Iterator[RowBatch]:
        rank, world_size, worker, workers = _shard(self.rank, self.world_size)
        epoch, skip = self.epoch, self.next_batch
        for index, batch in enumerate(self.global_batches(epoch, world_size)):
            if index < skip or (index - skip) % workers != worker:
                continue  # replayed (resume) or another worker's: never collated here
            per_rank = len(batch) // world_size
            yield RowBatch(batch[rank * per_rank : (rank + 1) * per_rank], epoch, index)
        if rank == 0 and worker == 0:
            log.info("epoch %d of the training stream: %s", epoch, self.stats)

    # -- position ---------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What determines the stream (a resumed run must match it)."""
        _, world_size, _, _ = _shard(self.rank, self.world_size)
        sources = [
            {"source": str(s), "size": Path(s.source).stat().st_size if not isinstance(s.source, HubDataset) and Path(s.source).is_file() else None,
             "weight": s.weight, "max_rows": s.max_rows}
            for s in self.specs
        ]
        return {
            "seed": self.seed, "batch_size": self.batch_size, "world_size": world_size, "shuffle_buffer": self.shuffle_buffer,
            "prepend_instructions": self.prepend_instructions, "on_bad_row": self.on_bad_row, "probabilities": self.probabilities,
            "leftovers": self.leftovers, "max_buffered_rows": self.max_buffered_rows, "sources": sources,
        }

    def mark_consumed(self, epoch: int, index: int) -> None:
        """Record that global batch `index` of `epoch` was trained on (called in the main process)."""
        self.epoch, self.next_batch = epoch, index + 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "settings": self.settings()}

    def load_state_dict(self, state: dict) -> None:
        saved, current = state["settings"], self.settings()
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            raise DataError(
                "cannot resume the training stream exactly: the checkpoint's data settings differ from this run's "
                + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            )
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


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
            # (epoch, index) of the global batch in the stream (RowBatch), for exact resume.
            "position": (rows.epoch, rows.index) if isinstance(rows, RowBatch) else None,
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

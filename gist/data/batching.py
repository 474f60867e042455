"""Same-task batching of the training stream, with DDP / DataLoader-worker sharding and exact resume.

Same-task batches (as GIST v0 trained; GISTEmbed, arXiv:2402.16829): rows go into a buffer per task_name in
stream order; a full buffer
becomes a batch (so every batch holds ONE task, whether the task's rows are contiguous or scattered);
batches pass through a seeded shuffle pool of `shuffle_buffer` batches. Leftovers (< batch_size rows
of a task at the end of an epoch) are dropped by default, as GIST drops chunks that span two tasks.
Under DDP the buffers fill GLOBAL batches (batch_size x world_size rows) that are split across ranks;
several sources can be mixed by weight or temperature (gist.data.sources); the stream position can be
saved and resumed exactly. See `SameTaskBatches` for the policies and memory bound.

    stream = SameTaskBatches(["train.jsonl"], batch_size=16, seed=42)
    for rows in stream:  # RowBatch: a list of parsed rows of one task, with .epoch and .index
        batch = collator(rows)  # gist.data.collate.Collator -> TrainBatch
    state = stream.state_dict()  # {"epoch", "next_batch", "settings"}; load_state_dict(state) resumes
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from gist.data.records import DataError, HubDataset, _check_on_bad_row, iter_rows
from gist.data.sources import SourceSpec, mixture_probabilities, source_spec

log = logging.getLogger(__name__)


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
        return itertools.islice(iter_rows([spec.source], on_bad_row=self.on_bad_row), spec.max_rows)

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
            raise ValueError(
                f"max_buffered_rows {self.max_buffered_rows} < global batch size - 1 = {size - 1}: no task could fill a batch"
            )
        rng = random.Random(f"{self.seed}:{epoch}")
        buffers: dict[str, list[dict]] = {}  # partial buffers, least recently appended first
        held = 0
        pool: list[list[dict]] = []
        stats = self.stats = {
            "rows": 0,
            "batches": 0,
            "evicted_rows": 0,
            "leftover_rows": 0,
            "emitted_leftover_batches": 0,
            "peak_buffered_rows": 0,
        }
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
            {
                "source": str(s),
                "size": Path(s.source).stat().st_size
                if not isinstance(s.source, HubDataset) and Path(s.source).is_file()
                else None,
                "weight": s.weight,
                "max_rows": s.max_rows,
            }
            for s in self.specs
        ]
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": world_size,
            "shuffle_buffer": self.shuffle_buffer,
            "on_bad_row": self.on_bad_row,
            "probabilities": self.probabilities,
            "leftovers": self.leftovers,
            "max_buffered_rows": self.max_buffered_rows,
            "sources": sources,
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

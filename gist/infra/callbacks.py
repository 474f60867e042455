"""Small training callbacks."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch import Callback


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append one JSON line per record to `path` (its folder created), flushed when the file closes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


class Throughput(Callback):
    """Logs `train/samples_per_s`: rows (anchor/positive[/negative] tuples) per second of training step
    wall time, data loading included (time between consecutive batch ends)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            pl_module.log("train/samples_per_s", batch.size / (now - self._last), prog_bar=True, batch_size=batch.size)
        self._last = now


class StepSeed(Callback):
    """Seeds torch's RNG (dropout) before every training batch from (seed, the batch's (epoch, index) in the
    training stream, rank), so a step's randomness does not depend on what ran before it in this process:
    a run resumed from a checkpoint draws the same dropout masks as an uninterrupted one (Lightning does
    not checkpoint RNG states; validation, DataLoader iterators and restarts consume the global RNG; and
    Lightning's batch_idx is not the same after a restart at an epoch's end). Batches without a stream
    position fall back to (epoch, global step, batch_idx)."""

    def __init__(self, seed: int = 42) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        import torch

        position = getattr(batch, "position", None)  # a gist.data.collate.TrainBatch's (epoch, index)
        where = position if position is not None else (trainer.current_epoch, trainer.global_step, batch_idx)
        key = f"{self.seed}:{where}:{trainer.global_rank}".encode()
        torch.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)


class BatchLog(Callback):
    """Appends one JSON line per training batch to `<dir>/rank<R>.jsonl`: global step, epoch, the batch's
    (epoch, index) in the stream, task and the text ids (gist.data.records.text_id) of its anchors, to audit
    exactly which rows a run trained on (and compare a resumed run with an uninterrupted one)."""

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "position": batch.position,
            "task": batch.task,
            "anchor_ids": batch.text_ids["anchor"].tolist(),
        }
        append_jsonl(Path(self.dir) / f"rank{trainer.global_rank}.jsonl", [record])


class TrainSteps(Callback):
    """Appends one JSON line per training batch to `path` (`<run_dir>/train_steps.jsonl` in
    conf/callbacks/default.yaml), on global rank 0 only: `{"step", "task", "loss", "position"}`, the step
    being the optimizer step the batch trains (metrics.csv's `step`), `loss` rank 0's `train/loss`, and
    `position` the batch's (epoch, index) in the training stream. Batches are same-task, so this splits
    `train/loss` by task, which metrics.csv cannot (it mixes tasks of different loss levels, and logs every
    `log_every_n_steps` only); read it with `gist.evaluation.runs.Run.task_losses`.

    Losses stay on their device until `flush_every` batches are buffered: one host sync and one file append
    per flush, not per step. A crash loses at most the unflushed batches; a resumed run appends the steps it
    repeats again, and the reader keeps the last record of each (step, position)."""

    def __init__(self, path: str, flush_every: int = 50) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = path
        self.flush_every = flush_every
        self._pending: list[tuple[dict, object]] = []  # (record without loss, detached loss tensor)
        self._step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # at batch end the optimizer has stepped and global_step moved on

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not trainer.is_global_zero or loss is None:
            return
        position = getattr(batch, "position", None)
        record = {
            "step": self._step,
            "task": getattr(batch, "task", None),
            "position": list(position) if position is not None else None,
        }
        # Lightning hands over the loss divided by accumulate_grad_batches (what backward saw): undo it.
        self._pending.append((record, loss.detach() * trainer.accumulate_grad_batches))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        self.flush()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.flush()  # the steps before a failure are the ones worth reading

    def flush(self) -> None:
        if not self._pending:
            return
        import torch

        losses = torch.stack([loss.float().reshape(()) for _, loss in self._pending]).tolist()
        records = [{**record, "loss": loss} for (record, _), loss in zip(self._pending, losses)]
        self._pending = []
        append_jsonl(self.path, records)

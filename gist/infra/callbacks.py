"""Small training callbacks."""

from __future__ import annotations

import time

from lightning.pytorch import Callback


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
        import json
        from pathlib import Path

        path = Path(self.dir) / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "position": batch.position,
            "task": batch.task,
            "anchor_ids": batch.text_ids["anchor"].tolist(),
        }
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

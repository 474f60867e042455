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
            pl_module.log("train/samples_per_s", batch["size"] / (now - self._last), prog_bar=True, batch_size=batch["size"])
        self._last = now

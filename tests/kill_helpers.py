"""A callback that SIGKILLs the training run (its whole process group: every DDP rank and DataLoader
worker, as a pre-empted node) when a given optimizer step is about to start; used by tests/test_resume.py."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)

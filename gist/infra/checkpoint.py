"""Checkpoint files that survive a kill mid-save, and that load without running pickled code.

`AtomicCheckpointIO` is Lightning's checkpoint plugin (conf/trainer/default.yaml: `plugins`). A save
serializes to a temporary file in the target's folder, flushes and fsyncs it, then `os.replace`s it
over the target (atomic on POSIX within one file system) and fsyncs the folder so the rename itself
is durable. A process killed at any point leaves either the previous file or the new one, never a
truncated one; stray `*.tmp-*` files from a kill are removed by the next save of the same target.

Loading uses `torch.load(weights_only=True)`: tensors, containers and primitives only, no arbitrary
objects, so a tampered checkpoint cannot run code on resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike, write=None) -> None:
    """`torch.save(obj, path)` that is all-or-nothing. `write(obj, file)` defaults to torch.save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic, durable local saves; `weights_only=True` loads by default."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path, write=self._write)

    @staticmethod
    def _write(obj: Any, f) -> None:
        torch.save(obj, f)

    def load_checkpoint(
        self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(
            path, map_location=map_location, weights_only=True if weights_only is None else weights_only
        )

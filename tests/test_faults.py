"""Faults during training: a NaN/inf loss or gradient stops the run and never reaches a checkpoint;
checkpoint writes are atomic (a kill mid-save leaves the previous checkpoint loadable)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from gist.core.loss_modules import MNRLLoss
from gist.core.module import NonFiniteError
from gist.infra.checkpoint import AtomicCheckpointIO, atomic_torch_save
from gist.train import train
from tests.helpers import ROOT, load, tiny_cfg


class FaultAtCall(MNRLLoss):
    """MNRL whose `fault_at`-th call (0-based) returns a NaN loss ("loss"), or a finite loss with NaN
    gradients ("grad": d sqrt(u)/du is infinite at u = 0, times du/dx = 0)."""

    def __init__(self, fault_at: int, kind: str = "loss", **kwargs) -> None:
        super().__init__(**kwargs)
        self.fault_at, self.kind, self.calls = fault_at, kind, 0

    def forward(self, student, guide=None, text_ids=None, target_offset=0):
        loss, stats = super().forward(student, guide, text_ids, target_offset)
        self.calls += 1
        if self.calls - 1 == self.fault_at:
            a = student["anchor"]
            loss = loss * float("nan") if self.kind == "loss" else loss + torch.sqrt((a - a.detach()).abs().sum())
        return loss, stats


def _fault_cfg(tmp_path, tiny_student, gist_file, mteb_dir, kind, fault_at):
    cfg = tiny_cfg(
        tmp_path,
        tiny_student,
        None,
        gist_file,
        mteb_dir,
        [
            "guide=none",
            "loss=mnrl",
            "trainer.max_steps=8",
            "trainer.val_check_interval=100",
            "data.val_sts_dir=null",
            "export=false",
            "compare_tasks_dir=null",
            "callbacks.model_checkpoint.monitor=null",
            "+callbacks.model_checkpoint.every_n_train_steps=1",
        ],
    )
    with open_dict(cfg):
        cfg.callbacks.model_checkpoint.filename = "step{step:06d}"
        cfg.loss = {"_target_": f"{__name__}.FaultAtCall", "fault_at": fault_at, "kind": kind}
    return cfg


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_loss_or_gradient_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_student, gist_file, mteb_dir, kind
):
    k = 3  # steps 0..2 train and are checkpointed (every step); step 3 goes non-finite
    cfg = _fault_cfg(tmp_path, tiny_student, gist_file, mteb_dir, kind, k)
    with pytest.raises(
        NonFiniteError, match="non-finite training loss" if kind == "loss" else "non-finite gradients"
    ) as err:
        train(cfg)
    assert f"at step {k}" in str(err.value) and "last checkpoint" in str(err.value)
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == k
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not list(ckpt_dir.glob("*.tmp-*"))
    # ...and it is a usable checkpoint: a fresh student loads it.
    from gist.core.encoder import Encoder

    enc = Encoder(str(tiny_student))
    enc.load_state_dict({n.removeprefix("student."): v for n, v in last["state_dict"].items()})


@pytest.mark.unit
def test_a_checkpoint_with_non_finite_weights_is_refused(tiny_student):
    from gist.core.encoder import Encoder
    from gist.core.module import GISTModule

    module = GISTModule(Encoder(str(tiny_student)), MNRLLoss())
    module.on_save_checkpoint({"state_dict": module.state_dict()})  # fine
    with torch.no_grad():
        next(module.student.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


class _Partial(AtomicCheckpointIO):
    """Writes half of the serialized checkpoint, then fails, as a full disk or a crash would."""

    @staticmethod
    def _write(obj, f) -> None:
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise OSError("disk full (simulated)")


@pytest.mark.unit
def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(OSError, match="disk full"):
        _Partial().save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


KILLED_MID_SAVE = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from gist.infra.checkpoint import AtomicCheckpointIO

    class KilledMidWrite(AtomicCheckpointIO):
        @staticmethod
        def _write(obj, f):
            buf = io.BytesIO()
            torch.save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: like a pre-emption

    path = sys.argv[1]
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(100_000)}, path)
    KilledMidWrite().save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, path)
""")


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    partial = list(tmp_path.glob("last.ckpt.tmp-*"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < path.stat().st_size  # the kill hit mid-write
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(100_000))
    # The next save of the same file clears the debris.
    atomic_torch_save({"step": 3}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 3


@pytest.mark.unit
def test_the_trainer_config_writes_checkpoints_atomically(tmp_path):
    from hydra.utils import instantiate

    cfg = load(["trainer=cpu"])
    trainer = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

"""Exact resume: SIGKILL `scripts/train.py` mid-run, resume from its last step checkpoint, and get the same
final weights (<= 1e-6) and the same sequence of training rows as an uninterrupted run.

Each run is a separate `python scripts/train.py ...` process (tiny random BERTs, CPU, one thread), so the
kill is a real SIGKILL of the whole process group and the resume goes through Hydra, the checkpoint and
the datamodule's state exactly as a user's would. Validation runs every 3 steps (it consumes the global
RNG; gist.infra.callbacks.StepSeed makes dropout independent of it), checkpoints every 3 steps. Those
are slow; the default tier resumes in process (a run stopped at step 3 of 6, no kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 15  # a multiple of the checkpoint interval 3; 72 rows, 3 tasks: 9 batches of 8 per epoch, so the runs cross an epoch boundary


def _train(run: Path, gist_file, tiny_student, tiny_guide, mteb_dir, extra=(), expect_kill=False) -> None:
    args = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "data=files",
        f"data.train_files=[{gist_file}]",
        "data.batch_size=8",
        "data.shuffle_buffer=2",
        f"data.val_sts_dir={mteb_dir / 'TinySTS'}",
        "data.val_batch_size=8",
        f"model.name={tiny_student}",
        "model.max_length=32",
        f"guide.name={tiny_guide}",
        "guide.max_length=48",
        "logger=csv",
        "export=false",
        "compare_tasks_dir=null",
        f"hydra.run.dir={run}",
        f"paths.cache_dir={run.parent / 'cache'}",
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "+callbacks.batch_log._target_=gist.infra.callbacks.BatchLog",
        f"+callbacks.batch_log.dir={run / 'batches'}",
    ]
    keys = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    args = [a for a in args if a.split("=", 1)[0] not in keys] + list(extra)  # an extra override replaces a default
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def _log(run: Path, rank: int = 0) -> list[dict]:
    # Without Lightning's batch_idx: after a restart at an epoch's end it keeps counting from the old
    # epoch (9, 10, ... instead of 0, 1, ...); nothing in training depends on it (StepSeed uses the
    # stream position).
    records = [json.loads(line) for line in (run / "batches" / f"rank{rank}.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "batch_idx"} for r in records]


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def _check_resume(tmp_path, gist_file, tiny_student, tiny_guide, mteb_dir, kill_at: int, extra=(), ranks=(0,)):
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    _train(full, gist_file, tiny_student, tiny_guide, mteb_dir, extra)
    _train(
        killed,
        gist_file,
        tiny_student,
        tiny_guide,
        mteb_dir,
        [*extra, "+callbacks.kill._target_=tests.helpers.KillAtStep", f"+callbacks.kill.step={kill_at}"],
        expect_kill=True,
    )
    ckpt = killed / "checkpoints" / "resume" / "last.ckpt"
    resumed_from = _state(ckpt)["global_step"]
    assert resumed_from == kill_at // 3 * 3 and 0 < resumed_from < kill_at  # the kill lost trained steps
    _train(resumed, gist_file, tiny_student, tiny_guide, mteb_dir, [*extra, f"ckpt_path={ckpt}"])

    for rank in ranks:
        uninterrupted = _log(full, rank)
        assert [r["step"] for r in uninterrupted] == list(range(STEPS))
        before = [r for r in _log(killed, rank) if r["step"] < resumed_from]
        after = _log(resumed, rank)
        assert [r["step"] for r in after] == list(range(resumed_from, STEPS))
        assert before + after == uninterrupted  # step, epoch, stream position, task and anchor text ids
    a, b = (
        _state(full / "checkpoints" / "resume" / "last.ckpt"),
        _state(resumed / "checkpoints" / "resume" / "last.ckpt"),
    )
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, atol=1e-6, rtol=0, msg=name)
    # ...and the weights moved, so the comparison is not vacuous.
    assert any(not torch.equal(tensor, _state(ckpt)["state_dict"][name]) for name, tensor in a["state_dict"].items())

    return _log(full, ranks[0])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_in_process_from_the_step_checkpoint_equals_an_uninterrupted_run(
    tmp_path, gist_file, tiny_student, tiny_guide, mteb_dir, lora
):
    """The default tier's exact resume (the SIGKILL variants below are slow): `train(cfg)` stopped after
    step 3 of a 6-step schedule, resumed from its checkpoints/resume/last.ckpt, trains on the same rows
    and ends with the same weights as an uninterrupted 6-step run. With LoRA the checkpoints hold the
    adapters only, and resuming from them is exact too."""
    from gist.train import train
    from tests.helpers import assert_metric, assert_run_files, tiny_cfg

    def run(name: str, steps: int, ckpt: Path | None = None) -> Path:
        cfg = tiny_cfg(
            tmp_path / name,
            tiny_student,
            tiny_guide,
            gist_file,
            mteb_dir,
            [
                # No guide (the SIGKILL variants below train GIST with one): nothing to load or prefill, 3 short runs.
                "guide=none",
                "loss=no_guide",
                f"trainer.max_steps={steps}",
                "trainer.val_check_interval=3",
                "optim.schedule_steps=6",
                "optim.warmup_steps=2",
                "data.shuffle_buffer=2",
                "export=false",
                "compare_tasks_dir=null",
                "+callbacks.batch_log._target_=gist.infra.callbacks.BatchLog",
                f"+callbacks.batch_log.dir={tmp_path / name / 'batches'}",
                *([f"ckpt_path={ckpt}"] if ckpt else []),
                *(["model.lora={r:4,alpha:8}"] if lora else []),
            ],
        )
        assert_metric(train(cfg))
        assert_run_files(Path(cfg.paths.output_dir), model=False)
        return tmp_path / name

    full, stopped = run("full", 6), run("stopped", 3)
    ckpt = stopped / "run" / "checkpoints" / "resume" / "last.ckpt"
    assert _state(ckpt)["global_step"] == 3
    resumed = run("resumed", 6, ckpt)
    assert [r["step"] for r in _log(full)] == list(range(6))
    assert _log(stopped) + _log(resumed) == _log(full)  # step, epoch, stream position, task and anchor text ids
    a, b = (_state(r / "run" / "checkpoints" / "resume" / "last.ckpt") for r in (full, resumed))
    assert a["global_step"] == b["global_step"] == 6 and a["state_dict"].keys() == b["state_dict"].keys()
    assert all("lora_" in k for k in a["state_dict"] if k.startswith("student.")) == lora
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, atol=1e-6, rtol=0, msg=name)
    assert any(not torch.equal(t, _state(ckpt)["state_dict"][n]) for n, t in a["state_dict"].items())  # it trained on


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [8, 10])
def test_sigkill_and_resume_equals_an_uninterrupted_run(
    tmp_path, gist_file, tiny_student, tiny_guide, mteb_dir, kill_at
):
    """kill_at=8 resumes mid-epoch 0 from step 6; kill_at=10 resumes from step 9, the last batch of
    epoch 0 (the saved position points at the start of epoch 1)."""
    log = _check_resume(tmp_path, gist_file, tiny_student, tiny_guide, mteb_dir, kill_at)
    assert [r["epoch"] for r in log] == [0] * 9 + [1] * (STEPS - 9)
    assert [r["position"][1] for r in log] == list(range(9)) + list(range(STEPS - 9))


@pytest.mark.slow
def test_sigkill_and_resume_with_dataloader_workers(tmp_path, gist_file, tiny_student, tiny_guide, mteb_dir):
    _check_resume(tmp_path, gist_file, tiny_student, tiny_guide, mteb_dir, kill_at=8, extra=["data.num_workers=2"])


@pytest.mark.slow
def test_sigkill_and_resume_under_two_process_ddp(tmp_path, gist_file, tiny_student, tiny_guide, mteb_dir):
    """trainer=ddp_sim: 2 CPU processes on gloo, 4 rows per rank (global batches of 8, 9 per epoch)."""
    log = _check_resume(
        tmp_path,
        gist_file,
        tiny_student,
        tiny_guide,
        mteb_dir,
        kill_at=8,
        extra=["trainer=ddp_sim", "data.batch_size=4"],
        ranks=(0, 1),
    )
    other = _log(tmp_path / "full", 1)
    for r0, r1 in zip(log, other):
        assert (r0["position"], r0["task"]) == (r1["position"], r1["task"])  # same task on both ranks
        assert not set(r0["anchor_ids"]) & set(r1["anchor_ids"])

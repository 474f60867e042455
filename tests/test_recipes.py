"""The README's Recipes, run as written with tiny overrides applied (tests/test_sweeps.py has the rest:
`sweep` is its 2 x 2 test). What cannot run here is said per test: the hub (gist_small runs offline on
the tiny fixtures, and as written must fail fast), GPUs (DDP runs on 2 CPU processes), several nodes
(torchrun runs 1 node x 2 processes) and SLURM (the launcher config is composed and its sbatch script
rendered, not submitted)."""

from __future__ import annotations

import os
import re
import socket
import sys

import pytest
from omegaconf import OmegaConf

from tests.helpers import (
    ROOT,
    job_dirs,
    load,
    recipe,
    recipes,
    run_in_process,
    run_subprocess,
    tiny,
    with_overrides,
)

CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true"]


@pytest.mark.unit
def test_readme_has_every_recipe():
    assert set(recipes()) == {
        "quickstart",
        "gist_small",
        "gist_qwen3",
        "lora",
        "matryoshka",
        "sweep",
        "sweep_guide",
        "ddp",
        "torchrun",
        "slurm",
    }
    for hub_only in ("gist_small", "gist_qwen3"):
        assert recipes()[hub_only][0] == {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}


def test_quickstart_recipe(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch):
    run_in_process(
        with_overrides(recipe("quickstart"), tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir)), monkeypatch
    )
    (run,) = (tmp_path / "logs" / "quickstart" / "runs").iterdir()
    assert OmegaConf.load(run / "config.yaml").task_name == "quickstart" and (run / "model" / "modules.json").exists()


def test_gist_small_recipe_as_written_fails_fast_offline(tmp_path, monkeypatch, capsys):
    args = [*recipe("gist_small"), f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(SystemExit) as stop:  # scripts/train.py turns the DataError into one error line, exit 1
        run_in_process(args, monkeypatch)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert re.search(
        r"(?ms)^error: hub dataset avsolatorio/medi-data-mteb_avs_triplets@238a0499.*HF_HUB_OFFLINE.*data.train_files",
        err,
    ), err
    assert "Traceback" not in err


def test_gist_small_recipe_on_the_tiny_fixtures(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch):
    """The released recipe's config (bf16, batch 16, its schedule) on tiny offline stand-ins, CPU, fast_dev_run."""
    stand_ins = [
        *tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir),
        "model.pooling=mean",
        "guide.pooling=cls",
        "trainer.accelerator=cpu",
        "debug=fdr",
    ]  # the recipe's trainer=gpu (bf16-mixed) on the CPU
    run_in_process(with_overrides(recipe("gist_small"), stand_ins), monkeypatch)
    (run,) = (tmp_path / "logs" / "gist_small" / "runs").iterdir()
    cfg = OmegaConf.load(run / "config.yaml")
    assert (
        cfg.trainer.precision == "bf16-mixed" and cfg.optim.schedule_steps == 4_547_000 and cfg.loss.temperature == 0.01
    )


def test_gist_qwen3_recipe_as_written_fails_fast_offline(tmp_path, gist_file, monkeypatch, capsys):
    args = [*recipe("gist_qwen3"), f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(SystemExit) as stop:
        run_in_process(args, monkeypatch)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "error: hub dataset avsolatorio/medi-data-mteb_avs_triplets" in err and "Traceback" not in err
    # With local data instead, the student is the next thing that needs the hub: it fails fast too.
    local = [*args, "data=files", f"data.train_files=[{gist_file}]", "data.val_sts_dir=null"]
    with pytest.raises(SystemExit) as stop:
        run_in_process(local, monkeypatch)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Cannot load model 'Qwen/Qwen3-Embedding-0.6B'" in err and "Traceback" not in err


def test_gist_qwen3_recipe_on_a_tiny_decoder(tmp_path, tiny_qwen3, tiny_guide, gist_file, mteb_dir, monkeypatch):
    """The decoder recipe's config (last-token pooling, query instructions, GIST loss with a guide, bf16,
    gradient checkpointing) on a tiny random Qwen3 and the tiny guide, CPU, fast_dev_run."""
    stand_ins = [
        *tiny(tmp_path, tiny_qwen3, tiny_guide, gist_file, mteb_dir),
        "guide.pooling=cls",
        "trainer.accelerator=cpu",
        "debug=fdr",
    ]
    run_in_process(with_overrides(recipe("gist_qwen3"), stand_ins), monkeypatch)
    (run,) = (tmp_path / "logs" / "gist_qwen3" / "runs").iterdir()
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.pooling == "lasttoken" and cfg.model.instructions.query == "Instruct: {instruct}\nQuery:"
    assert cfg.loss._target_.endswith("GISTLoss") and cfg.guide.name == str(tiny_guide)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.gradient_checkpointing


def test_lora_recipe(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch):
    run_in_process(
        with_overrides(recipe("lora"), tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir)), monkeypatch
    )
    (run,) = (tmp_path / "logs" / "quickstart" / "runs").iterdir()
    assert (run / "model" / "adapter" / "adapter_config.json").is_file()
    assert OmegaConf.load(run / "config.yaml").model.lora.r == 16


def test_matryoshka_recipe(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch):
    import json

    tiny_widths = ["loss.matryoshka_dims=[32,16,8]", "compare_dims=[16]", f"compare_tasks_dir={mteb_dir}"]
    args = with_overrides(
        recipe("matryoshka"), [*tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir), *tiny_widths]
    )
    run_in_process(args, monkeypatch)
    (run,) = (tmp_path / "logs" / "quickstart" / "runs").iterdir()
    tasks = [r["task"] for r in json.loads((run / "eval" / "comparison.json").read_text())["rows"]]
    assert "TinySTS" in tasks  # the full width...
    assert (run / "eval" / "dim16" / "comparison.json").is_file()  # ...and the truncated one
    assert "TinySTS @16d" in (run / "model" / "README.md").read_text()


# Slow (the real mpnet and MiniLM guides): the guide sweep's jobs compose to their loss and guide in the default tier
# (test_sweeps.py::test_paper_ablation_axes_are_all_there), and a multirun trains in test_sweeps.py::test_2x2_sweep_...
@pytest.mark.slow
def test_sweep_guide_recipe(tmp_path, tiny_student, gist_file, mteb_dir, monkeypatch):
    """`-m sweep=guide`: the real offline mpnet and MiniLM guides, a tiny student; guide=none runs no_guide."""
    run_in_process(
        with_overrides(recipe("sweep_guide"), tiny(tmp_path, tiny_student, None, gist_file, mteb_dir, guide=False)),
        monkeypatch,
    )
    jobs = job_dirs(tmp_path / "logs")
    assert jobs[0].parent.name.endswith("_guide")
    cfgs = [OmegaConf.load(j / "config.yaml") for j in jobs]
    assert [c.guide.name if c.guide else None for c in cfgs] == [
        "sentence-transformers/all-mpnet-base-v2",
        "sentence-transformers/all-MiniLM-L6-v2",
        None,
    ]
    assert [c.loss._target_ for c in cfgs] == ["gist.core.loss_modules.GISTLoss"] * 2 + [
        "gist.core.loss_modules.NoGuideLoss"
    ]
    assert all((j / "model" / "modules.json").exists() for j in jobs)


# In the default run (about 15-30 s on 2 cores): the default tier's 2-process DDP run through the CLI.
def test_ddp_recipe_on_two_cpu_processes(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    out = run_subprocess(
        with_overrides(recipe("ddp"), [*tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir), *CPU]), tmp_path
    )
    assert "MEMBER: 2/2" in out
    (run,) = (tmp_path / "logs" / "quickstart" / "runs").iterdir()  # the child wrote no run folder of its own
    assert (run / "model" / "modules.json").exists() and (run / "train_ddp_process_1.log").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Slow (about 30 s): 2-process DDP through the CLI is test_ddp_recipe_on_two_cpu_processes in the default tier.
@pytest.mark.slow
def test_torchrun_recipe_one_node_two_processes(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    _, argv = recipes()["torchrun"]
    assert argv[0] == "torchrun"
    script = argv.index("scripts/train.py")
    launcher = with_overrides(
        argv[1:script],
        [
            "--nnodes=1",
            "--nproc-per-node=2",
            "--node-rank=0",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
        ],
    )
    run_dir = tmp_path / "torchrun_run"
    args = with_overrides(
        argv[script + 1 :],
        [
            *tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir),
            *CPU,
            "trainer.devices=2",
            "trainer.num_nodes=1",
            f"hydra.run.dir={run_dir}",
        ],
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "scripts" / "train.py")]
    out = run_subprocess(args, tmp_path, cmd=torchrun)
    assert "MEMBER: 2/2" in out
    assert (run_dir / "model" / "modules.json").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "logs" / "quickstart").exists()  # every rank wrote to the one run folder


class Submitted(Exception):
    pass


def test_slurm_recipe_composes_and_submits_an_sbatch_array(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch
):
    """Cannot submit here: the recipe runs through Hydra and hydra-submitit-launcher up to the sbatch
    call, which is replaced by a stand-in that keeps the sbatch script submitit wrote and stops."""
    from submitit.slurm.slurm import SlurmExecutor

    args = with_overrides(recipe("slurm"), tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir))
    cfg = load([a.split(",")[0] if "," in a and "[" not in a else a for a in args if a != "-m"])  # job 0's config
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 8, 8, "gpu")
    assert (
        cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
        and cfg.trainer.devices * cfg.trainer.num_nodes == 16
    )

    def fake_submit(self, command):
        raise Submitted(self._make_submission_file_text(command, "test"))

    # submitit's SLURM executor insists on finding srun; this one is never run (the sbatch call is replaced).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho 'srun stand-in: not a SLURM cluster' >&2\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    monkeypatch.setattr(SlurmExecutor, "_submit_command", fake_submit)
    with pytest.raises(Submitted) as sbatch:
        run_in_process(args, monkeypatch)
    script = str(sbatch.value)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --array=0-1%2",
        "export TOKENIZERS_PARALLELISM=false",
    ):
        assert line in script, script
    assert "srun" in script and "submitit.core._submit" in script

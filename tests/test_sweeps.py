"""Hydra multirun through scripts/train.py: ready sweeps compose, each job has its own folder, config,
exported model and W&B run, the sweeper gets the metric, every experiment runs, DDP jobs in a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    CONF,
    job_dirs,
    load,
    read_wandb_file,
    recipe,
    run_in_process,
    run_subprocess,
    tiny,
    wandb_runs,
    with_overrides,
)

SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


# --- ready sweeps (config only) ---------------------------------------------------------------------


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_ready_sweep_composes_and_each_value_is_a_valid_override(sweep):
    from hydra.utils import instantiate

    from gist.core.module import check_guide

    cfg = load([f"sweep={sweep}"])
    params = cfg.hydra.sweeper.params
    assert len(params) >= 1 and cfg.hydra.sweep.dir.endswith(f"_{sweep}")
    for key, values in params.items():
        # glob(*) over a config group (sweep=ablation: every file of conf/ablation/), else a comma list
        values = sorted(p.stem for p in (CONF / key).glob("*.yaml")) if values == "glob(*)" else values.split(",")
        assert len(values) >= 3, (key, values)
        for value in values:  # each job's config composes, its loss instantiates and goes with its guide
            job = load([f"sweep={sweep}", f"{key}={value}"])
            check_guide(instantiate(job.loss), job.guide is not None)


def test_paper_ablation_axes_are_all_there():
    """The paper's axes: guide and loss (as conf/ablation/ variants, each a loss with the guide it goes
    with), margin, batch size, learning rate, warm-up, temperature; sweep=ablation crosses variants x seeds."""
    params = {s: load([f"sweep={s}"]).hydra.sweeper.params for s in SWEEPS}
    axes = {key for p in params.values() for key in p}
    assert axes == {
        "ablation",
        "seed",
        "loss.margin",
        "data.batch_size",
        "optim.lr",
        "optim.warmup_steps",
        "loss.temperature",
    }

    def composed(sweep: str) -> list[tuple[str, str | None]]:
        jobs = [load([f"sweep={sweep}", f"ablation={v}"]) for v in params[sweep].ablation.split(",")]
        return [
            (job.loss._target_.rsplit(".", 1)[-1], job.guide.name.rsplit("/", 1)[-1] if job.guide else None)
            for job in jobs
        ]

    assert composed("guide") == [
        ("GISTLoss", "all-mpnet-base-v2"),
        ("GISTLoss", "all-MiniLM-L6-v2"),
        ("NoGuideLoss", None),
    ]
    assert composed("loss") == [("GISTLoss", "all-mpnet-base-v2"), ("NoGuideLoss", None), ("MNRLLoss", None)]


@pytest.mark.parametrize(
    "choice,guide,message",
    [
        (["guide=none", "loss=gist"], False, "loss GISTLoss needs a guide model but none is set (guide=none)"),
        (
            ["experiment=gist_small", "guide=none"],
            False,
            "loss GISTLoss needs a guide model but none is set (guide=none)",
        ),
        (["loss=mnrl"], True, "loss MNRLLoss uses no guide, but a guide is set: add guide=none"),
    ],
)
def test_a_loss_guide_mismatch_fails_with_one_line_before_loading_anything(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch, capsys, choice, guide, message
):
    args = [*choice, *tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, guide=guide)]
    monkeypatch.setattr("gist.core.encoder.Encoder.__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    # guide=none only removes the guide (tests/test_config.py: check_guide's rule); the CLI stops before any model loads.
    with pytest.raises(SystemExit) as stop:  # scripts/train.py: a user error is one line on stderr, exit 1
        run_in_process(args, monkeypatch)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


# --- multiruns, in process ----------------------------------------------------------------------------


def test_2x2_sweep_gives_4_jobs_with_own_folder_config_model_and_wandb_run(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch
):
    from omegaconf import OmegaConf
    from sentence_transformers import SentenceTransformer

    record = tmp_path / "returns.jsonl"
    args = recipe("sweep")  # README's: -m experiment=quickstart optim.lr=1e-5,5e-6 loss.temperature=0.01,0.05
    run_in_process(
        with_overrides(args, tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir)), monkeypatch, record
    )
    jobs = job_dirs(tmp_path / "logs")
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen, run_ids, groups, names = set(), set(), set(), set()
    for job in jobs:
        cfg = OmegaConf.load(job / "config.yaml")
        seen.add((cfg.optim.lr, cfg.loss.temperature))
        assert cfg.paths.output_dir == str(job)
        assert SentenceTransformer(str(job / "model")).encode(["a cat"]).shape == (1, 32)
        assert (job / "csv" / "metrics.csv").exists() and (job / "checkpoints" / "last.ckpt").exists()
        (run,) = wandb_runs(job)  # one W&B run per job, in the job's folder
        records = read_wandb_file(run)
        assert records["artifacts"] == []  # the exported model is logged only with logger.wandb.log_exported_model=true
        wandb_run = records["run"]
        run_ids.add(wandb_run.run_id)
        groups.add(wandb_run.run_group)
        names.add(wandb_run.display_name)
    assert seen == {(1e-5, 0.01), (1e-5, 0.05), (5e-6, 0.01), (5e-6, 0.05)}
    assert len(run_ids) == 4 and len(names) == 4
    assert groups == {f"quickstart-{jobs[0].parent.name}"}  # grouped by sweep
    # The sweeper received each job's optimized_metric (val/stsb_spearman), a float.
    returns = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(r["dir"] for r in returns) == [str(j) for j in jobs]
    assert all(isinstance(r["value"], float) and -1 <= r["value"] <= 1 for r in returns)
    for r in returns:
        best = next((Path(r["dir"]) / "checkpoints").glob("step*.ckpt"))
        assert f"spearman{r['value']:.4f}" in best.name


@pytest.mark.slow  # the default tier: every experiment composes (test_config.py), quickstart and gist_small run (test_recipes.py), multirun (test_2x2_sweep_...)
def test_every_experiment_runs_fast_dev_run_as_one_multirun(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch
):
    """`-m experiment=glob(*)`: each file of conf/experiment, hub-only parts swapped for the tiny offline
    fixtures (gist_small / gist_minilm use bge-small, UAE-Large and MEDI: test_config shows they fail fast)."""
    from omegaconf import OmegaConf

    experiments = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    record = tmp_path / "returns.jsonl"
    args = [
        "-m",
        "experiment=glob(*)",
        "debug=fdr",
        "trainer=cpu",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
        *tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir),
        "model.pooling=mean",
        "guide.pooling=cls",
    ]
    run_in_process(args, monkeypatch, record)
    returns = [json.loads(line) for line in record.read_text().splitlines()]
    ran = sorted(OmegaConf.load(Path(r["dir"]) / "config.yaml").task_name for r in returns)
    assert ran == experiments
    assert all(isinstance(r["value"], float) for r in returns)  # fast_dev_run validates once


# --- DDP jobs inside a sweep (2 CPU processes, gloo), real subprocesses ----------------------------------


# Slow (60-90 s each on 2 cores): the default tier has 2-process DDP through the CLI
# (test_recipes.py::test_ddp_recipe_on_two_cpu_processes, Lightning's popen launcher re-running the command
# line), in process (test_guide_cache.py's ddp_sim run), and sweeps (test_2x2_sweep_...); a DDP child of a
# multirun job running its job, not the sweep, is test_launch.py::test_child_of_a_multirun_job_runs_that_job_not_the_sweep.
@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["spawn", "popen"])
def test_sweep_of_ddp_sim_jobs(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, start_method):
    """Two jobs, each 2 processes. start_method=popen is Lightning's subprocess launcher, which re-runs the
    command line for rank 1: that child must run its job, not start the sweep again (gist/infra/launch.py)."""
    args = [
        "-m",
        "trainer=ddp_sim",
        f"trainer.strategy.start_method={start_method}",
        "optim.lr=1e-3,2e-3",
        "logger=default",
        *tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir),
    ]
    out = run_subprocess(args, tmp_path)
    assert out.count("MEMBER: 2/2") == 2, out[-4000:]  # rank 1 of each job joined
    assert sorted(p.name for p in (tmp_path / "logs" / "quickstart").iterdir()) == ["multiruns"]  # no stray run folders
    jobs = job_dirs(tmp_path / "logs")
    assert [j.name for j in jobs] == ["0", "1"]  # exactly one sweep of 2 jobs: no child started a sweep
    run_ids = set()
    for job in jobs:
        assert (job / "model" / "modules.json").exists() and (job / "csv" / "metrics.csv").exists()
        (run,) = wandb_runs(job)
        run_ids.add(read_wandb_file(run)["run"].run_id)
        if start_method == "popen":  # the child ran in its parent job's folder, under its own job name
            assert (job / "train_ddp_process_1.log").exists()
    assert len(run_ids) == 2

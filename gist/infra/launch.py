"""One training job among many: Hydra multirun x Lightning DDP x W&B, without the known breakages.

scripts/train.py wraps each job in `isolated_job` and calls `ddp_child_argv` before Hydra parses the
command line. What each guards against:

1. Lightning's subprocess DDP launcher (`strategy=ddp`) starts ranks 1..N-1 by re-running the script
   with the parent's command line plus `hydra.run.dir=<hydra.run.dir>`. Under `-m` that command line is
   the whole sweep: every child would start a sweep of its own, and `hydra.run.dir` is not the job's
   folder. The parent job puts its own overrides and output folder in the environment (GIST_DDP_JOB);
   `ddp_child_argv` turns a child's command line into exactly that one job, in run mode.
2. That launcher also leaves LOCAL_RANK / WORLD_SIZE / MASTER_PORT in `os.environ` and the default
   process group alive. The next job of a sweep in the same process would then believe its processes
   were started externally (Lightning reads LOCAL_RANK for that) and wait for ranks that never come.
   `isolated_job` restores the environment and destroys the process group after each job.
3. A W&B run left open is silently reused by the next job's WandbLogger: `isolated_job` finishes it
   (gist.infra.loggers.finish_wandb).

`job_identity` names a job for W&B: a multirun job is grouped by its sweep folder.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from hydra.types import RunMode

ENV_JOB = "GIST_DDP_JOB"
# Hydra options whose value is the next token (when not written as --opt=value).
_VALUE_OPTIONS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package"}


def is_multirun(hydra_cfg) -> bool:
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def job_identity(hydra_cfg, task_name: str, output_dir: str | Path) -> dict:
    """{"group", "name"} for W&B: multirun job k of sweep folder S -> group `<task>-<S>`, name `<task>-<S>-<k>`;
    a single run -> no group, name `<task>-<run folder>`."""
    if is_multirun(hydra_cfg):
        group = f"{task_name}-{Path(hydra_cfg.sweep.dir).name}"
        return {"group": group, "name": f"{group}-{hydra_cfg.job.num}"}
    return {"group": None, "name": f"{task_name}-{Path(output_dir).name}"}


def job_env(hydra_cfg, output_dir: str | Path) -> dict[str, str]:
    """What a DDP child needs to re-run this one job: its overrides and output folder (see module doc)."""
    if hydra_cfg is None:
        return {}
    return {ENV_JOB: json.dumps({"overrides": list(hydra_cfg.overrides.task), "output_dir": str(output_dir)})}


def ddp_child_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """The command line a DDP child (LOCAL_RANK > 0) should run: Hydra's options from `argv` (config
    path / name) but not `-m`, the parent job's own overrides, and its output folder as hydra.run.dir.
    Anything else (the parent process, torchrun / SLURM ranks, which have no GIST_DDP_JOB) is unchanged."""
    spec, rank = env.get(ENV_JOB), env.get("LOCAL_RANK", "0")
    if not spec or rank == "0":
        return list(argv)
    job = json.loads(spec)
    options, args = [], iter(argv[1:])
    for arg in args:
        if arg in ("-m", "--multirun") or not arg.startswith("-"):
            continue  # overrides (swept or not) come from the job; Lightning's appended hydra.* too
        options.append(arg)
        if arg in _VALUE_OPTIONS:
            options.append(next(args, ""))
    run_dir = job["output_dir"].replace("\\", "\\\\").replace('"', '\\"')
    return [
        argv[0],
        *options,
        *job["overrides"],
        f'hydra.run.dir="{run_dir}"',
        "hydra.output_subdir=null",
        f"hydra.job.name=train_ddp_process_{rank}",
    ]


@contextmanager
def isolated_job(env: dict[str, str], on_exit=()):
    """Run one job with `env` added to os.environ; afterwards call each of `on_exit` (e.g. finishing the
    W&B run), destroy the default process group if the job created one, and restore os.environ as it was."""
    import torch.distributed as dist

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        try:
            for fn in on_exit:
                fn()
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(saved)

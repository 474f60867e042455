"""gist/infra/launch.py: a DDP child of a multirun job runs that one job; jobs leave no DDP state behind."""

from __future__ import annotations

import json
import os

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

from gist.infra.launch import ENV_JOB, ddp_child_argv, isolated_job, job_env, job_identity

pytestmark = pytest.mark.unit


def hydra_node(mode, overrides=("optim.lr=1e-05", "loss.temperature=0.05"), num=3):
    return OmegaConf.create(
        {
            "mode": mode,
            "sweep": {"dir": "/logs/quickstart/multiruns/2026-11-27_05-00-00"},
            "job": {"num": num},
            "overrides": {"task": list(overrides)},
        }
    )


def test_child_of_a_multirun_job_runs_that_job_not_the_sweep():
    # What Lightning's subprocess launcher gives rank 1: the sweep's command line + its own hydra.* args.
    argv = [
        "scripts/train.py",
        "-m",
        "--config-name",
        "train",
        "optim.lr=1e-5,5e-6",
        "loss.temperature=0.01,0.05",
        'hydra.run.dir="/logs/quickstart/runs/2026-11-27_05-00-00"',
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
    ]
    env = {"LOCAL_RANK": "1", **job_env(hydra_node(RunMode.MULTIRUN), "/logs/q/multiruns/t/3")}
    assert ddp_child_argv(argv, env) == [
        "scripts/train.py",
        "--config-name",
        "train",
        "optim.lr=1e-05",
        "loss.temperature=0.05",
        'hydra.run.dir="/logs/q/multiruns/t/3"',
        "hydra.output_subdir=null",
        "hydra.job.name=train_ddp_process_1",
    ]


def test_argv_unchanged_for_rank_zero_and_for_processes_started_outside_lightning():
    argv = ["scripts/train.py", "-m", "optim.lr=1e-5,5e-6"]
    env = job_env(hydra_node(RunMode.MULTIRUN), "/x")
    assert ddp_child_argv(argv, {"LOCAL_RANK": "0", **env}) == argv
    assert ddp_child_argv(argv, {"LOCAL_RANK": "1"}) == argv  # torchrun / SLURM ranks: no GIST_DDP_JOB
    assert ddp_child_argv(argv, {}) == argv


def test_output_dir_with_quotes_is_escaped_for_hydra():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    env = {"LOCAL_RANK": "1", ENV_JOB: json.dumps({"overrides": [], "output_dir": '/a b/"c"'})}
    run_dir = ddp_child_argv(["s.py"], env)[1]
    (parsed,) = OverridesParser.create().parse_overrides([run_dir])
    assert parsed.value() == '/a b/"c"'


def test_job_identity_groups_multirun_jobs_by_sweep_folder():
    assert job_identity(hydra_node(RunMode.MULTIRUN), "quickstart", "/x/3") == {
        "group": "quickstart-2026-11-27_05-00-00",
        "name": "quickstart-2026-11-27_05-00-00-3",
    }
    assert job_identity(hydra_node(RunMode.RUN), "quickstart", "/logs/quickstart/runs/2026-11-27_06-00-00") == {
        "group": None,
        "name": "quickstart-2026-11-27_06-00-00",
    }
    assert job_identity(None, "t", "/r/x")["name"] == "t-x"


def test_isolated_job_restores_environment_and_runs_exit_hooks_on_error(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    calls = []
    try:
        with isolated_job({ENV_JOB: "{}"}, on_exit=[lambda: calls.append("finish")]):
            assert os.environ[ENV_JOB] == "{}"
            os.environ["LOCAL_RANK"] = "0"  # what Lightning's launcher leaves behind
            os.environ["MASTER_PORT"] = "12345"
            raise RuntimeError("job failed")
    except RuntimeError:
        pass
    assert calls == ["finish"]
    assert ENV_JOB not in os.environ and "LOCAL_RANK" not in os.environ


def test_isolated_job_destroys_the_process_group_a_ddp_job_leaves():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with isolated_job({}):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        assert dist.is_initialized()
    assert not dist.is_initialized()

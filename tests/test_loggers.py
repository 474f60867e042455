"""W&B: offline unless a key is configured; a run writes an offline W&B run beside the CSV log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gist.infra.loggers import finish_wandb, wandb_key_configured, wandb_logger, wandb_mode
from gist.train import train
from tests.helpers import assert_metric, assert_run_files, read_wandb_file, tiny_cfg


@pytest.mark.unit
def test_key_detection(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_key_configured()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_key_configured()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_key_configured()


def test_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    logger = wandb_logger(project="gist-test", save_dir=str(tmp_path))
    assert logger._wandb_init["mode"] == "offline" and logger.experiment.settings.mode == "offline"  # started
    logger.experiment.finish()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online" and wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    logger = wandb_logger(mode="disabled", project="gist-test", save_dir=str(tmp_path))
    assert logger._wandb_init["mode"] == "disabled"
    finish_wandb([logger])


@pytest.mark.slow  # the default tier reads a training run's offline W&B run below (and one per sweep job in test_sweeps.py)
def test_training_writes_an_offline_wandb_run(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    cfg = tiny_cfg(
        tmp_path,
        tiny_student,
        tiny_guide,
        gist_file,
        mteb_dir,
        ["logger=default", "export=false", "compare_tasks_dir=null"],
    )
    assert_metric(train(cfg))
    assert_run_files(Path(cfg.paths.output_dir), model=False)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").exists()


def test_wandb_run_holds_config_metrics_tags_group_and_the_exported_model(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir
):
    cfg = tiny_cfg(
        tmp_path,
        tiny_student,
        tiny_guide,
        gist_file,
        mteb_dir,
        [
            "logger=default",
            "tags=[tiny,wandb]",
            "logger.wandb.group=my-group",
            "logger.wandb.log_exported_model=true",
        ],
    )
    assert_metric(train(cfg))
    assert_run_files(Path(cfg.paths.output_dir), evaluation=True)
    (run_dir,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
    run = read_wandb_file(run_dir)
    assert run["run"].run_group == "my-group" and list(run["run"].tags) == ["tiny", "wandb"]
    assert run["run"].job_type == "train"
    assert run["run"].display_name == f"{cfg.task_name}-{Path(cfg.paths.output_dir).name}"
    assert run["config"]["optim"]["lr"] == cfg.optim.lr and run["config"]["loss"]["temperature"] == cfg.loss.temperature
    for key in (
        "train/loss",
        "train/masked_frac",
        "train/effective_negatives",
        "lr",
        "train/samples_per_s",
        "val/stsb_spearman",
    ):
        assert key in run["history_keys"], (key, run["history_keys"])
    # The end-of-run comparison: a table, and mteb/<task> summaries of the fine-tuned and the base model.
    rows = json.loads((Path(cfg.paths.output_dir) / "eval" / "comparison.json").read_text())["rows"]
    table = next(h for h in run["history"] if "eval/comparison/_type" in h)  # W&B flattens the table's record
    assert table["eval/comparison/_type"] == "table-file" and table["eval/comparison/nrows"] == len(rows) == 3
    for row in rows:
        assert run["summary"][f"mteb/{row['task']}"] == pytest.approx(row["fine_tuned"])
        assert run["summary"][f"mteb_base/{row['task']}"] == pytest.approx(row["base"])
    (artifact,) = [a for a in run["artifacts"] if a.type == "model"]  # (the table is an artifact of its own)
    # Not Lightning's checkpoint artifact name (model-<run id>).
    assert artifact.type == "model" and artifact.name == f"sentence-transformers-{run['run'].run_id}"
    files = {e.path for e in artifact.manifest.contents}
    assert "modules.json" in files and "model.safetensors" in files
    assert "best" in list(artifact.aliases)


@pytest.mark.slow  # the default tier checks it on every job of test_sweeps.py::test_2x2_sweep_...
def test_no_artifact_unless_enabled(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    cfg = tiny_cfg(
        tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["logger=default", "compare_tasks_dir=null"]
    )
    assert_metric(train(cfg))
    assert_run_files(Path(cfg.paths.output_dir))
    (run_dir,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
    assert read_wandb_file(run_dir)["artifacts"] == []


def test_failing_wandb_init_warns_and_the_run_goes_on_with_csv(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch, caplog
):
    import wandb

    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("no network (forced by the test)")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = tiny_cfg(
        tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["logger=default", "compare_tasks_dir=null"]
    )
    with caplog.at_level("WARNING", logger="gist.infra.loggers"):
        metric = train(cfg)
    assert "W&B logger disabled (CommError: no network (forced by the test)); metrics still go to CSV" in caplog.text
    run = Path(cfg.paths.output_dir)
    assert_metric(metric)
    assert_run_files(run)
    assert "train/loss" in (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert not list(run.glob("wandb/offline-run-*"))


@pytest.mark.unit
def test_online_mode_without_a_key_falls_back(monkeypatch, tmp_path, caplog):
    """Online W&B with no key configured: wandb.init refuses; we warn and return None (CSV goes on)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level("WARNING", logger="gist.infra.loggers"):
        assert wandb_logger(mode="online", project="gist-test", save_dir=str(tmp_path)) is None
    assert "W&B logger disabled" in caplog.text

"""W&B: offline unless a key is configured; a run writes an offline W&B run beside the CSV log."""

from __future__ import annotations

from pathlib import Path

from gist.loggers import wandb_key_configured, wandb_logger


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
    assert logger._wandb_init["mode"] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logger(project="gist-test", save_dir=str(tmp_path))._wandb_init["mode"] == "online"
    assert wandb_logger(mode="disabled", project="gist-test", save_dir=str(tmp_path))._wandb_init["mode"] == "disabled"


def test_training_writes_an_offline_wandb_run(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    from tests.test_train import tiny_cfg, train_script

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["logger=default", "export=false", "compare_tasks_dir=null"])
    train_script.train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").exists()

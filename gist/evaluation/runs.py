"""Runs of scripts/train.py read back from their Hydra output folders; nothing here trains.

A run folder holds `config.yaml` (resolved), `checkpoints/`, `csv/metrics.csv`, the exported `model/`
and, after evaluation, `eval/<label>.json` ({task: main score x 100}) with `<label>.details.json`
beside it (labels: `base`, `fine_tuned`, checkpoint names). Single runs live in
`<log_dir>/<task_name>/runs/<time>/`, multirun jobs in `<log_dir>/<task_name>/multiruns/<time>/<job>/`.

    from gist.evaluation.runs import list_runs, runs_table
    runs = list_runs("logs")              # oldest first
    runs_table(runs)                      # one row per run: task, tags, model, lr, steps, best val, ...
    run = runs[-1]
    run.metrics()                         # csv/metrics.csv as a DataFrame
    run.load_model()                      # the exported model as an Encoder; run.load_model("last")
    run.results()                         # {"base": {...}, "fine_tuned": {...}, ...}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gist.core.encoder import Encoder
from gist.infra.compat import upgrade_config

RUN_PATTERNS = ("*/runs/*/config.yaml", "*/multiruns/*/*/config.yaml")
STEP_RE = re.compile(r"step(\d+)")
SCORE_RE = re.compile(r"spearman(-?\d+(?:\.\d+)?)")


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and any((path / d).is_dir() for d in ("checkpoints", "model", "csv"))


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def label(self) -> str:
        return self.path.stem


@dataclass
class Run:
    """One training run (a single run or one multirun job)."""

    path: Path
    _step_cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def config(self) -> DictConfig:
        """The run's resolved config; one written by an older package layout is upgraded (gist.infra.compat)."""
        return upgrade_config(OmegaConf.load(self.path / "config.yaml"))[0]

    @property
    def task_name(self) -> str:
        return str(self.config.get("task_name") or self.path.parent.parent.name)

    @property
    def is_multirun_job(self) -> bool:
        return self.path.parent.parent.name == "multiruns"

    @property
    def name(self) -> str:
        """`<time>` for a single run, `<time>-<job>` for a multirun job: unique within a task."""
        return f"{self.path.parent.name}-{self.path.name}" if self.is_multirun_job else self.path.name

    def _order(self) -> tuple:
        time, job = (self.path.parent.name, self.path.name) if self.is_multirun_job else (self.path.name, "")
        return time, int(job) if job.isdigit() else -1, self.task_name

    @property
    def id(self) -> str:
        return f"{self.task_name}/{self.name}"

    @property
    def tags(self) -> list[str]:
        return list(self.config.get("tags") or [])

    @property
    def model_dir(self) -> Path | None:
        path = self.path / "model"
        return path if (path / "modules.json").is_file() else None

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Lightning checkpoints, ordered by training step (the best one and `last` may share a step)."""
        ckpts = [Checkpoint(p, self._step(p)) for p in (self.path / "checkpoints").glob("*.ckpt")]
        return sorted(ckpts, key=lambda c: (c.step, c.label == "last"))

    def _step(self, path: Path) -> int:
        match = STEP_RE.match(path.stem)
        if match:
            return int(match.group(1))
        if path not in self._step_cache:  # `last.ckpt`: read the step from the file (memory-mapped, cheap)
            self._step_cache[path] = int(
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            )
        return self._step_cache[path]

    def checkpoint(self, which: str) -> Checkpoint:
        """A checkpoint by label (`last`, `step000050-spearman0.8690`), file name, path, or `best`."""
        ckpts = self.checkpoints
        if not ckpts:
            raise FileNotFoundError(f"{self.path}: no checkpoints")
        if which == "best":  # by the monitored score in the file name (conf/callbacks/default.yaml)
            scored = [(float(m.group(1)), c.step, c) for c in ckpts if (m := SCORE_RE.search(c.label))]
            if not scored:
                raise FileNotFoundError(
                    f"{self.path}: no checkpoint named with its score (have: {[c.label for c in ckpts]})"
                )
            return max(scored, key=lambda t: t[:2])[2]
        for c in ckpts:
            if which in (c.label, c.path.name, str(c.path)):
                return c
        raise FileNotFoundError(f"{self.path}: no checkpoint {which!r} (have: {[c.label for c in ckpts]})")

    def metrics(self):
        """csv/metrics.csv as a pandas DataFrame (one row per logging call; NaN where not logged)."""
        import pandas as pd

        path = self.path / "csv" / "metrics.csv"
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def summary(self) -> dict:
        cfg = self.config
        metrics = self.metrics()
        val = metrics["val/stsb_spearman"].dropna() if "val/stsb_spearman" in metrics else []
        return {
            "id": self.id,
            "task_name": self.task_name,
            "tags": ",".join(self.tags),
            "model": OmegaConf.select(cfg, "model.name"),
            "guide": OmegaConf.select(cfg, "guide.name"),
            "loss": str(OmegaConf.select(cfg, "loss._target_", default="")).rsplit(".", 1)[-1],
            "lr": OmegaConf.select(cfg, "optim.lr"),
            "max_steps": OmegaConf.select(cfg, "trainer.max_steps"),
            "last_logged_step": int(metrics["step"].max()) if "step" in metrics and len(metrics) else None,
            "best_val_spearman": float(max(val)) if len(val) else None,
            "checkpoints": len(self.checkpoints),
            "exported": self.model_dir is not None,
            "evaluated": ",".join(sorted(self.results())),
            "path": str(self.path),
        }

    def load_model(self, checkpoint: str | None = None) -> Encoder:
        """The exported model (checkpoint=None), or a checkpoint's student rebuilt around its weights."""
        if checkpoint is None:
            if self.model_dir is None:
                raise FileNotFoundError(
                    f"{self.path}: no exported model/ (pass a checkpoint: {[c.label for c in self.checkpoints]})"
                )
            return Encoder(str(self.model_dir))
        ckpt = torch.load(self.checkpoint(checkpoint).path, map_location="cpu", weights_only=True)
        if "gist_student" not in ckpt:
            raise ValueError(
                f"{self.checkpoint(checkpoint).path}: no 'gist_student' entry (not written by gist's module)"
            )
        encoder = Encoder(**ckpt["gist_student"])
        state = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
        encoder.check_loaded(encoder.load_state_dict(state, strict=False))
        return encoder.eval()

    def exported_step(self) -> int | None:
        """The step of the exported model (train.py exports the best checkpoint, and records the step)."""
        details = self.path / "eval" / "fine_tuned.details.json"
        if details.is_file():
            return json.loads(details.read_text())["model"].get("step")
        try:
            return self.checkpoint("best").step
        except FileNotFoundError:
            return None

    def base_model(self) -> Encoder:
        """The model the run started from, as its config describes it."""
        from hydra.utils import instantiate

        return instantiate(self.config.model)

    def results(self) -> dict[str, dict[str, float]]:
        """{label: {task: main score x 100}} of every evaluation saved in the run's eval/ folder."""
        folder = self.path / "eval"
        files = sorted(
            p for p in folder.glob("*.json") if not p.name.endswith(".details.json") and p.stem != "comparison"
        )
        return {p.stem: json.loads(p.read_text()) for p in files}

    def details(self, label: str) -> dict:
        return json.loads((self.path / "eval" / f"{label}.details.json").read_text())


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path}: not a run directory (needs config.yaml and checkpoints/, model/ or csv/)")
    return Run(path)


def list_runs(log_dir: str | Path = "logs", task_name: str | None = None, tags: list[str] | None = None) -> list[Run]:
    """Runs and multirun jobs under `log_dir`, oldest first; filtered by task name and/or tags (all must match)."""
    log_dir = Path(log_dir)
    paths = {p.parent for pattern in RUN_PATTERNS for p in log_dir.glob(pattern)}
    runs = [Run(p) for p in paths if is_run_dir(p)]
    if task_name is not None:
        runs = [r for r in runs if r.task_name == task_name]
    if tags:
        runs = [r for r in runs if set(tags) <= set(r.tags)]
    return sorted(runs, key=Run._order)


def runs_table(runs: list[Run]):
    """One row per run (pandas DataFrame)."""
    import pandas as pd

    return pd.DataFrame([r.summary() for r in runs])

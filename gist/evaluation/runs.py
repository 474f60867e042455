"""Runs of scripts/train.py read back from their Hydra output folders; nothing here trains.

A run folder holds `config.yaml` (resolved), `checkpoints/`, `csv/metrics.csv`, `train_steps.jsonl` (each
training batch's task and loss, gist.infra.callbacks.TrainSteps), the exported `model/` and, after evaluation,
`eval/<label>.json` ({task: main score x 100}) with `<label>.details.json` beside it (labels: `base`,
`fine_tuned`, checkpoint names). Single runs live in
`<log_dir>/<task_name>/runs/<time>/`, multirun jobs in `<log_dir>/<task_name>/multiruns/<time>/<job>/`.

    from gist.evaluation.runs import list_runs, results_frame, runs_table, smooth_losses
    runs = list_runs("logs")              # oldest first
    runs_table(runs)                      # one row per run: task, tags, model, lr, steps, best val, ...
    run = runs[-1]
    run.metrics()                         # csv/metrics.csv as a DataFrame
    run.load_model()                      # the exported model as an Encoder; run.load_model("last")
    run.results()                         # {"base": {...}, "fine_tuned": {...}, ...}
    results_frame(runs)                   # every saved score of the runs, each base model once
    smooth_losses(run.task_losses())      # step, task, loss, smoothed: the training loss per task
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
TRAIN_STEPS = "train_steps.jsonl"  # gist.infra.callbacks.TrainSteps (conf/callbacks/default.yaml)
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

    def task_losses(self):
        """The run's training loss per batch with the batch's task (read_task_losses of its train_steps.jsonl):
        columns step, task, loss; empty for a run trained before that file existed."""
        return read_task_losses(self.path / TRAIN_STEPS)

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

    def model_step(self, label: str) -> int | None:
        """The training step of an evaluated model (`fine_tuned`, a checkpoint label), from its saved details,
        else from the label; None for `base` or when unknown. Reads no checkpoint."""
        path = self.path / "eval" / f"{label}.details.json"
        step = json.loads(path.read_text())["model"].get("step") if path.is_file() else None
        if step is not None:
            return int(step)
        match = STEP_RE.match(label)
        return int(match.group(1)) if match else None

    def base_label(self) -> str:
        """`name@revision` (12 characters) of the base model that eval/base.json scored, else the config's
        model name: runs that started from the same weights share it."""
        path = self.path / "eval" / "base.details.json"
        if path.is_file():
            model = json.loads(path.read_text())["model"]
            return f"{model['name']}@{str(model['revision'])[:12]}"
        return str(OmegaConf.select(self.config, "model.name"))


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


RESULT_COLUMNS = ["run", "model", "base", "step"]  # then one column per task


def results_frame(runs: list[Run]):
    """Every evaluation saved in the runs' eval/ folders (nothing is evaluated here) as one DataFrame: first
    each base model once, however many runs started from it (run `base`, model its `name@revision`), then
    each run's models (checkpoints by step, then the exported `fine_tuned`). Columns RESULT_COLUMNS (`base`:
    the model of the row's base row, for deltas), then one per task (main score x 100, NaN where missing)."""
    import pandas as pd

    bases: dict[tuple, str] = {}  # (base label, its scores) -> its row's model name
    base_rows, rows = [], []
    for run in runs:
        results = run.results()
        base = None
        if "base" in results:
            key = (run.base_label(), tuple(sorted(results["base"].items())))
            if key not in bases:
                # The same weights scored differently (other task data): a second row, named after its run.
                taken = key[0] in bases.values()
                bases[key] = f"{key[0]} ({run.id})" if taken else key[0]
                base_rows.append({"run": "base", "model": bases[key], "base": None, "step": 0, **results["base"]})
            base = bases[key]
        labels = sorted(
            (label for label in results if label != "base"),
            key=lambda label: (label == "fine_tuned", run.model_step(label) or 0, label),
        )
        for label in labels:
            step = run.model_step(label)
            rows.append({"run": run.id, "model": label, "base": base, "step": step, **results[label]})
    frame = pd.DataFrame(base_rows + rows)
    tasks = sorted(c for c in frame.columns if c not in RESULT_COLUMNS)
    return frame.reindex(columns=RESULT_COLUMNS + tasks)


def read_task_losses(path: str | Path):
    """A gist.infra.callbacks.TrainSteps file as a DataFrame with columns step, task, loss, one row per
    training batch, ordered by step. A step that a resumed run trained again keeps its last record (the
    one the run continued from); a line a crash cut short is skipped. Missing file: no rows."""
    import pandas as pd

    path = Path(path)
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the write a SIGKILL interrupted; the next append starts a new line
            continue
    frame = pd.DataFrame(records, columns=["step", "task", "loss", "position"])
    # Under gradient accumulation several batches share a step: their stream positions tell them apart.
    frame["_batch"] = frame["position"].map(lambda p: tuple(p) if isinstance(p, list) else p)
    frame = frame.drop_duplicates(subset=["step", "_batch"], keep="last")
    frame = frame.sort_values("step", kind="stable").reset_index(drop=True)
    return frame.astype({"step": int, "loss": float})[["step", "task", "loss"]]


def smooth_losses(losses, halflife: float = 5.0):
    """`losses` (Run.task_losses) with a `smoothed` column: each task's exponential moving average over its
    own batches (`halflife` in that task's batches). Per task, because same-task batches of different loss
    levels (a pair task near 0, triplet tasks far higher) alternate and hide each task's trend in one
    curve; bias-corrected (pandas' adjust=True), so a curve does not start from 0."""
    if halflife <= 0:
        raise ValueError(f"halflife must be > 0 batches, got {halflife}")
    out = losses.sort_values("step", kind="stable").reset_index(drop=True)
    out["smoothed"] = out.groupby("task", sort=False, dropna=False)["loss"].transform(
        lambda s: s.ewm(halflife=halflife).mean()
    )
    return out

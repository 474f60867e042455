"""An ablation sweep read back: one row per job, aggregated per variant over seeds; nothing here trains.

A sweep is a Hydra multirun folder of scripts/train.py (conf/sweep/ablation.yaml): job folders `0/`, `1/`,
... each with `.hydra/overrides.yaml` (its `ablation=<variant>` and `seed=<n>`), `config.yaml`,
`csv/metrics.csv` and, from the end-of-run comparison, `eval/base.json` and
`eval/fine_tuned.json` ({task: main score x 100}).

    from gist.analysis.ablation import load_sweep, scores_frame, per_variant
    jobs = load_sweep("logs/ablation/multiruns/<time>_ablation")
    scores = scores_frame(jobs)             # long: variant, seed, task, score
    per_variant(scores)                     # variant x task: mean, std over seeds, n

scripts/results.py renders docs/RESULTS.md from these; notebooks/compare_checkpoints.ipynb charts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf

from gist.evaluation.runs import Run

MEAN = "mean"  # the column/row name of the mean over the evaluated tasks


@dataclass
class Job:
    """One finished job of an ablation sweep."""

    path: Path
    variant: str
    seed: int
    scores: dict[str, float]  # fine-tuned model, {task: main score x 100}
    base: dict[str, float]  # the base model, same tasks
    train: dict[str, float]  # means over the logged training steps (masked_frac, effective_negatives, loss)
    config: dict = field(repr=False, default_factory=dict)
    started: datetime | None = None
    finished: datetime | None = None

    @property
    def wall_s(self) -> float | None:
        return (self.finished - self.started).total_seconds() if self.started and self.finished else None


def _overrides(path: Path) -> dict[str, str]:
    file = path / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(file.read_text()) if file.is_file() else []
    return dict(item.lstrip("+~").split("=", 1) for item in items or [] if "=" in item)


def _job_span(path: Path) -> tuple[datetime | None, datetime | None]:
    """When the job started (Hydra writes .hydra/ first) and finished (its last file written, normally
    the evaluation's eval/comparison.*): file times, since train.log does not cover the evaluation."""
    hydra = [p.stat().st_mtime for p in (path / ".hydra").glob("*.yaml")]
    files = [p.stat().st_mtime for p in path.rglob("*") if p.is_file()]
    if not hydra or not files:
        return None, None
    return datetime.fromtimestamp(min(hydra)), datetime.fromtimestamp(max(files))


def _train_means(run: Run) -> dict[str, float]:
    metrics = run.metrics()
    out = {}
    for name in ("train/masked_frac", "train/effective_negatives", "train/loss", "val/stsb_spearman"):
        if name in metrics and metrics[name].notna().any():
            column = metrics[name].dropna()
            out[name] = float(column.iloc[-1] if name.startswith("val/") else column.mean())
    return out


def load_job(path: str | Path) -> Job:
    """A job folder -> Job; raises FileNotFoundError naming the folder and what is missing."""
    path = Path(path)
    overrides = _overrides(path)
    if "ablation" not in overrides:
        raise FileNotFoundError(f"{path}: no `ablation=<variant>` in .hydra/overrides.yaml (not an ablation job)")
    run = Run(path)
    results = run.results()
    missing = [label for label in ("base", "fine_tuned") if label not in results]
    if missing:
        raise FileNotFoundError(f"{path}: no eval/{missing[0]}.json (the job did not finish its evaluation)")
    started, finished = _job_span(path)
    return Job(
        path=path,
        variant=overrides["ablation"],
        seed=int(run.config.get("seed")),
        scores=results["fine_tuned"],
        base=results["base"],
        train=_train_means(run),
        config=OmegaConf.to_container(run.config, resolve=False),
        started=started,
        finished=finished,
    )


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The numbered job folders of a multirun folder, in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep folder")
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def load_sweep(sweep_dir: str | Path, *, allow_incomplete: bool = False) -> list[Job]:
    """Every job of the sweep. An unfinished job (no evaluation yet) raises, unless allow_incomplete."""
    jobs = []
    for path in job_dirs(sweep_dir):
        try:
            jobs.append(load_job(path))
        except FileNotFoundError:
            if not allow_incomplete:
                raise
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no finished ablation job")
    return jobs


def variant_order(jobs: list[Job]) -> list[str]:
    """Variants in the order the sweep ran them (conf/sweep/ablation.yaml lists them in issue order)."""
    order: list[str] = []
    for job in sorted(jobs, key=lambda j: int(j.path.name) if j.path.name.isdigit() else 0):
        if job.variant not in order:
            order.append(job.variant)
    return order


def scores_frame(jobs: list[Job]) -> pd.DataFrame:
    """Long table: variant, seed, task, score (fine-tuned, x100), plus the mean over tasks as task `mean`."""
    rows = []
    for job in jobs:
        for task, score in sorted(job.scores.items()):
            rows.append({"variant": job.variant, "seed": job.seed, "task": task, "score": score})
        rows.append(
            {"variant": job.variant, "seed": job.seed, "task": MEAN, "score": float(np.mean(list(job.scores.values())))}
        )
    return pd.DataFrame(rows)


def base_scores(jobs: list[Job]) -> dict[str, float]:
    """The base model's scores (identical in every job: cached once per model); raises if they differ."""
    base = jobs[0].base
    for job in jobs[1:]:
        if job.base != base:
            raise ValueError(f"{job.path}: base-model scores differ from {jobs[0].path}'s: {job.base} vs {base}")
    return {**dict(sorted(base.items())), MEAN: float(np.mean(list(base.values())))}


def per_variant(scores: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """variant x task -> mean, std (sample std over seeds, ddof=1; NaN for one seed), n."""
    table = scores.groupby(["variant", "task"])["score"].agg(mean="mean", std="std", n="count").reset_index()
    if order:
        table["variant"] = pd.Categorical(table["variant"], categories=order, ordered=True)
        table = table.sort_values(["variant", "task"]).reset_index(drop=True)
        table["variant"] = table["variant"].astype(str)
    return table


def paired_difference(scores: pd.DataFrame, variant: str, reference: str) -> pd.DataFrame:
    """Per task: variant minus reference, paired by seed (same seed = same batches and order).

    Columns: task, mean, std (ddof=1 over the seed pairs), n (pairs), wins (pairs where variant > reference)."""
    a = scores[scores.variant == variant].pivot(index="seed", columns="task", values="score")
    b = scores[scores.variant == reference].pivot(index="seed", columns="task", values="score")
    diff = (a - b).dropna(how="all")
    return pd.DataFrame(
        {
            "task": diff.columns,
            "mean": diff.mean().values,
            "std": diff.std().values,
            "n": diff.count().values,
            "wins": (diff > 0).sum().values,
        }
    )


def train_stats(jobs: list[Job], order: list[str] | None = None) -> pd.DataFrame:
    """Per variant: masked fraction, effective negatives, training loss and final val Spearman (each the
    mean over the run's logged steps, then mean and std over seeds)."""
    rows = [{"variant": j.variant, "seed": j.seed, **j.train, "wall_s": j.wall_s} for j in jobs]
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c not in ("variant", "seed")]
    table = frame.groupby("variant")[numeric].agg(["mean", "std"])
    return table.reindex(order) if order else table


def variant_settings(jobs: list[Job], order: list[str]) -> pd.DataFrame:
    """What each variant trained with, read from its jobs' configs (one row per variant)."""
    rows = []
    for variant in order:
        cfg = next(j.config for j in jobs if j.variant == variant)
        loss, guide = cfg.get("loss") or {}, cfg.get("guide") or {}
        rows.append(
            {
                "variant": variant,
                "loss": str(loss.get("_target_", "")).rsplit(".", 1)[-1],
                "guide": guide.get("name") if guide else "none",
                "temperature": loss.get("temperature"),
                "margin": f"{loss.get('margin')} ({loss.get('margin_strategy')})" if "margin" in loss else "-",
                "seeds": ",".join(str(j.seed) for j in sorted(jobs, key=lambda j: j.seed) if j.variant == variant),
            }
        )
    return pd.DataFrame(rows)


def best_of(scores: pd.DataFrame, variants: list[str]) -> tuple[str, float]:
    """The variant with the highest mean over tasks (mean over seeds) among `variants`."""
    means = scores[(scores.task == MEAN) & scores.variant.isin(variants)].groupby("variant")["score"].mean()
    return str(means.idxmax()), float(means.max())


def sweep_wall(jobs: list[Job]) -> tuple[datetime | None, datetime | None]:
    starts = [j.started for j in jobs if j.started]
    ends = [j.finished for j in jobs if j.finished]
    return (min(starts) if starts else None), (max(ends) if ends else None)


T_CRIT_95 = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # two-sided, by df


def noise_verdict(values: pd.Series) -> tuple[float, float, str]:
    """Mean, paired t statistic (mean / (std / sqrt n)) and whether the mean is beyond seed noise: |t| above
    the two-sided 95 % critical value of Student's t with n - 1 degrees of freedom."""
    n, mean, std = values.count(), values.mean(), values.std()
    if n < 3 or pd.isna(std):
        return mean, float("nan"), "too few seeds"
    t = mean / (std / n**0.5) if std > 0 else float("inf") * (1 if mean >= 0 else -1)
    return mean, t, "beyond seed noise" if abs(t) > T_CRIT_95.get(n - 1, 1.96) else "within seed noise"

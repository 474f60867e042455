"""The training loss per task (gist.infra.callbacks.TrainSteps -> gist.evaluation.runs), saved results read
back without evaluating (results_frame), and the figures docs/RESULTS.md embeds (gist.analysis.report)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gist.evaluation.runs import list_runs, read_task_losses, results_frame, smooth_losses
from gist.infra.callbacks import TrainSteps

pytestmark = pytest.mark.unit


def _write_lines(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _train(callback: TrainSteps, trainer, batches: list[tuple[str, float]], first_step: int = 0) -> None:
    """Drive the callback's hooks as Lightning's training loop does, one optimizer step per batch."""
    for i, (task, loss) in enumerate(batches):
        step = first_step + i
        trainer.global_step = step
        batch = SimpleNamespace(task=task, position=(0, step))
        callback.on_train_batch_start(trainer, None, batch, i)
        trainer.global_step = step + 1  # the optimizer stepped before on_train_batch_end
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, batch, i)


def test_train_steps_records_each_batchs_step_task_and_loss_in_flushes(tmp_path):
    path = tmp_path / "run" / "train_steps.jsonl"
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, accumulate_grad_batches=1)
    callback = TrainSteps(str(path), flush_every=2)
    _train(callback, trainer, [("pairs", 0.25)])
    assert not path.exists()  # buffered until flush_every batches
    _train(callback, trainer, [("task-a", 6.5), ("pairs", 0.125)], first_step=1)
    assert len(path.read_text().splitlines()) == 2
    callback.on_train_end(trainer, None)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # The step a batch trains (metrics.csv's step), not the global step after its optimizer step.
    assert [(r["step"], r["task"], r["loss"], r["position"]) for r in records] == [
        (0, "pairs", 0.25, [0, 0]),
        (1, "task-a", 6.5, [0, 1]),
        (2, "pairs", 0.125, [0, 2]),
    ]
    losses = read_task_losses(path)
    assert list(losses.columns) == ["step", "task", "loss"] and list(losses["loss"]) == [0.25, 6.5, 0.125]


def test_train_steps_writes_on_rank_zero_only_and_undoes_gradient_accumulation(tmp_path):
    other = TrainSteps(str(tmp_path / "rank1.jsonl"), flush_every=1)
    _train(other, SimpleNamespace(global_step=0, is_global_zero=False, accumulate_grad_batches=1), [("pairs", 1.0)])
    other.on_train_end(None, None)
    assert not (tmp_path / "rank1.jsonl").exists()
    accumulating = TrainSteps(str(tmp_path / "acc.jsonl"))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, accumulate_grad_batches=4)
    _train(accumulating, trainer, [("pairs", 0.5)])  # Lightning hands over loss / accumulate_grad_batches
    accumulating.on_exception(trainer, None, RuntimeError("stopped"))  # a failing run keeps what it trained
    assert read_task_losses(tmp_path / "acc.jsonl")["loss"].tolist() == [2.0]
    with pytest.raises(ValueError, match="flush_every"):
        TrainSteps(str(tmp_path / "x.jsonl"), flush_every=0)


def test_read_task_losses_keeps_the_last_record_of_a_step_a_resumed_run_repeated(tmp_path):
    first = [
        {"step": s, "task": "pairs" if s % 2 else "task-a", "loss": 10.0 + s, "position": [0, s]} for s in range(4)
    ]
    resumed = [
        {"step": s, "task": "pairs" if s % 2 else "task-a", "loss": 20.0 + s, "position": [0, s]} for s in (2, 3)
    ]
    # Killed mid-append: a cut line, then the resumed run's lines; two accumulated batches share step 4.
    path = _write_lines(tmp_path / "steps.jsonl", first, tail='{"step": 4, "ta')
    with path.open("a") as f:
        f.write("\n" + "".join(json.dumps(r) + "\n" for r in resumed))
        f.write(json.dumps({"step": 4, "task": "pairs", "loss": 1.0, "position": [0, 4]}) + "\n")
        f.write(json.dumps({"step": 4, "task": "task-b", "loss": 2.0, "position": [0, 5]}) + "\n")
    losses = read_task_losses(path)
    assert losses.values.tolist() == [
        [0, "task-a", 10.0],
        [1, "pairs", 11.0],
        [2, "task-a", 22.0],
        [3, "pairs", 23.0],
        [4, "pairs", 1.0],
        [4, "task-b", 2.0],
    ]
    assert read_task_losses(tmp_path / "missing.jsonl").empty


def test_smoothing_follows_each_task_on_its_own_level():
    """Pair batches near 0 and triplet batches near 6 alternate: one moving average over all batches sits
    between them (near 3), each task's own stays on that task's level and trend."""
    import pandas as pd

    rows = [
        {"step": s, "task": "pairs" if s % 2 else "task-a", "loss": (0.5 if s % 2 else 6.0) - 0.01 * s}
        for s in range(40)
    ]
    smoothed = smooth_losses(pd.DataFrame(rows), halflife=3)
    pairs, triplets = (smoothed[smoothed["task"] == t] for t in ("pairs", "task-a"))
    assert pairs["smoothed"].between(0.0, 0.5).all() and triplets["smoothed"].between(5.5, 6.0).all()
    assert pairs["smoothed"].is_monotonic_decreasing and triplets["smoothed"].is_monotonic_decreasing
    mixed = pd.DataFrame(rows)["loss"].ewm(halflife=3).mean()
    assert mixed.iloc[10:].between(2.0, 4.0).all()  # what per-task smoothing avoids
    # Bias-corrected: a task's curve starts at its first loss; halflife 1 weighs the batch before by 1/2.
    two = smooth_losses(pd.DataFrame(rows[:4]), halflife=1).set_index("step")["smoothed"]
    assert two[0] == pytest.approx(6.0) and two[2] == pytest.approx((5.98 + 0.5 * 6.0) / 1.5, abs=1e-12)
    with pytest.raises(ValueError, match="halflife"):
        smooth_losses(pd.DataFrame(rows), halflife=0)


def _run(log_dir: Path, name: str, base: tuple[str, dict] | None, fine_tuned: dict, step: int = 4) -> Path:
    """A run folder with saved end-of-run results (no model, no checkpoint: nothing could be evaluated)."""
    path = log_dir / "t" / "runs" / name
    (path / "eval").mkdir(parents=True)
    (path / "csv").mkdir()
    (path / "config.yaml").write_text("task_name: t\nmodel:\n  name: some/base\n")
    files = {"fine_tuned": ({"name": f"t/{name}", "revision": f"step{step}-x", "step": step}, fine_tuned)}
    if base:
        files["base"] = ({"name": base[0], "revision": "0123456789abcdef", "step": None}, base[1])
    for label, (model, scores) in files.items():
        (path / "eval" / f"{label}.json").write_text(json.dumps(scores))
        (path / "eval" / f"{label}.details.json").write_text(json.dumps({"model": model}))
    return path


def test_results_frame_shows_each_base_model_once_and_each_runs_own_results(tmp_path):
    shared = ("org/base", {"A": 50.0, "B": 60.0})
    _run(tmp_path, "2026-01-01_00-00-00", shared, {"A": 51.0, "B": 62.0}, step=4)
    _run(tmp_path, "2026-01-02_00-00-00", shared, {"A": 53.0, "B": 61.0}, step=8)
    _run(tmp_path, "2026-01-03_00-00-00", ("org/other", {"A": 40.0, "B": 45.0}), {"A": 41.0})
    runs = list_runs(tmp_path)
    (runs[0].path / "eval" / "last.json").write_text(json.dumps({"A": 50.5, "B": 61.0}))  # a scored checkpoint
    (runs[0].path / "eval" / "last.details.json").write_text(json.dumps({"model": {"step": 3}}))
    frame = results_frame(runs)
    assert list(frame.columns) == ["run", "model", "base", "step", "A", "B"]
    rows = [tuple(None if v != v else v for v in row) for row in frame.itertuples(index=False)]  # NaN -> None
    assert rows == [
        ("base", "org/base@0123456789ab", None, 0, 50.0, 60.0),
        ("base", "org/other@0123456789ab", None, 0, 40.0, 45.0),
        ("t/2026-01-01_00-00-00", "last", "org/base@0123456789ab", 3, 50.5, 61.0),
        ("t/2026-01-01_00-00-00", "fine_tuned", "org/base@0123456789ab", 4, 51.0, 62.0),
        ("t/2026-01-02_00-00-00", "fine_tuned", "org/base@0123456789ab", 8, 53.0, 61.0),
        ("t/2026-01-03_00-00-00", "fine_tuned", "org/other@0123456789ab", 4, 41.0, None),
    ]


def test_the_same_base_scored_on_other_data_gets_a_row_of_its_own(tmp_path):
    _run(tmp_path, "2026-01-01_00-00-00", ("org/base", {"A": 50.0}), {"A": 51.0})
    _run(tmp_path, "2026-01-02_00-00-00", ("org/base", {"A": 55.0}), {"A": 56.0})
    frame = results_frame(list_runs(tmp_path))
    bases = frame[frame["run"] == "base"]["model"].tolist()
    assert bases == ["org/base@0123456789ab", "org/base@0123456789ab (t/2026-01-02_00-00-00)"]
    assert frame[frame["run"] != "base"]["base"].tolist() == bases


def _png(path: Path, source: str | None) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    fig.savefig(path, metadata={"Source": source} if source else {})  # as the notebook's save_figure
    return path


def test_results_markdown_embeds_the_figures_drawn_from_its_sweep(tmp_path):
    from gist.analysis.ablation import load_sweep
    from gist.analysis.report import SWEEP_FIGURES, png_text, results_markdown, sweep_figures
    from tests.helpers import make_fake_sweep

    sweep = make_fake_sweep(tmp_path)
    docs = tmp_path / "docs"
    figures = docs / "figures"
    figures.mkdir(parents=True)
    assert sweep_figures(figures, sweep.name, docs) == []
    _png(figures / "ablation_scores.png", sweep.name)
    _png(figures / "ablation_task_loss.png", "2026-01-01_00-00-00_ablation")  # an older sweep's chart
    _png(figures / "runs_scores.png", sweep.name)  # the notebook's picked runs: not the sweep's document
    (figures / "notes.txt").write_text("not a figure")
    assert png_text(figures / "ablation_scores.png")["Source"] == sweep.name
    assert png_text(figures / "notes.txt") == {}
    found = sweep_figures(figures, sweep.name, docs)
    assert found == [("figures/ablation_scores.png", SWEEP_FIGURES["ablation_scores.png"])]

    jobs = load_sweep(sweep)
    text = results_markdown(sweep, jobs, {}, "The reading.", "a test machine", figures=found)
    embed = f"![{SWEEP_FIGURES['ablation_scores.png']}](figures/ablation_scores.png)"
    assert embed in text and "ablation_task_loss.png" not in text and "runs_scores.png" not in text
    assert text.index("## Masking and training statistics") < text.index("## Figures") < text.index("## Reading")
    assert "## Figures" not in results_markdown(sweep, jobs, {}, None, "a test machine")

"""notebooks/compare_checkpoints.ipynb: committed without outputs, and executed headless on tiny runs."""

from __future__ import annotations

from itertools import takewhile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "compare_checkpoints.ipynb"
FIGURES = {"runs_scores.png", "runs_task_loss.png", "runs_curves.png", "ablation_scores.png", "ablation_task_loss.png"}


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def _files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _markdown_table(text: str) -> dict[str, dict[str, str]]:
    """The notebook's printed score table as {column: {task: cell}}."""
    lines = list(takewhile(lambda line: line.startswith("|"), text[text.index("| task |") :].splitlines()))
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {col: {row[0]: row[i] for row in rows} for i, col in enumerate(header)}


def test_notebook_runs_headless_against_tiny_runs(tiny_runs, mteb_dir, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    from gist.analysis.report import SWEEP_FIGURES, png_text, sweep_figures
    from gist.evaluation.runs import list_runs
    from tests.helpers import make_fake_sweep, write_jsonl

    sweep = make_fake_sweep(tmp_path)  # hand-picked scores; per-batch losses of two tasks for its loss chart
    for job in (p for p in sweep.iterdir() if p.is_dir()):
        steps = [{"step": s, "task": "pairs" if s % 2 else "triplets", "loss": 6.0 - 0.1 * s} for s in range(8)]
        write_jsonl(job / "train_steps.jsonl", steps)
    figures = tmp_path / "figures"
    runs = list_runs(tiny_runs)
    # The kernel inherits the environment: the notebook's parameters, and this checkout's `gist`.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("GIST_LOG_DIR", str(tiny_runs))
    monkeypatch.setenv("GIST_DATA_DIR", str(mteb_dir))
    monkeypatch.setenv("GIST_TASK_NAME", "tiny")
    monkeypatch.setenv("GIST_ABLATION_SWEEP", str(sweep))
    monkeypatch.setenv("GIST_FIGURES_DIR", str(figures))
    # The runs saved their end-of-run results: the notebook reads them and evaluates nothing, so no file under
    # the runs' root (eval/ results, the base model's result cache) is written or rewritten.
    before = _files(tiny_runs.parent)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    assert _files(tiny_runs.parent) == before

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES)  # scores, loss per task, other curves; the ablation's scores and loss per task
    written = {p.name: p for p in figures.iterdir()}
    assert set(written) == FIGURES
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 1000 for p in written.values())
    # docs/RESULTS.md embeds the ablation charts of the sweep it describes, and no other sweep's.
    assert [link for link, _ in sweep_figures(figures, sweep.name, tmp_path)] == [f"figures/{n}" for n in SWEEP_FIGURES]
    assert png_text(written["ablation_scores.png"])["Source"] == sweep.name
    assert sweep_figures(figures, "another_sweep", tmp_path) == []

    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # The score table: each run's own end-of-run results, and the base model both runs started from, once.
    (base_label,) = {run.base_label() for run in runs}
    table = _markdown_table(text)
    assert [c for c in table if c.startswith("base ")] == [f"base {base_label}"]
    for task in ("TinySTS", "TinyTopicClassification"):
        assert table[f"base {base_label}"][task] == f"{runs[0].results()['base'][task]:.2f}"
        for run in runs:
            assert table[f"{run.id} fine_tuned"][task] == f"{run.results()['fine_tuned'][task]:.2f}"
    assert set(table["task"]) == {"TinySTS", "TinyTopicClassification", "mean"}
    # The training loss split by task: every (task, run) of the runs' train_steps.jsonl, with its batch count.
    seen = set()
    for run in runs:
        for task, n in run.task_losses()["task"].value_counts().items():
            assert f"{task} | {run.id} | {n} batches | " in text
            seen.add(task)
    assert len(seen) >= 2 and seen <= {"task-a", "task-b", "pairs"}
    # The ablation section: the sweep's tables (gist_mpnet T1: seeds 80, 82, 84 -> 82.00 ± 2.00; paired
    # T1 differences 1, 2, 0 -> +1.00 ± 1.00, ahead in 2 of 3 seeds).
    for needle in (
        "2026-11-27_10-00-00_ablation: 6 finished jobs",
        "| gist_mpnet | 82.00 ± 2.00 |",
        "| gist_mpnet - no_guide | +1.00 ± 1.00 (2/3) |",
        "| base (no fine-tuning) | 70.00 | 50.00 | 60.00 |",
    ):
        assert needle in text
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "tiny/2026-01-02_00-00-00-0" in html  # the runs table

"""notebooks/compare_checkpoints.ipynb: committed without outputs, and executed headless on tiny runs."""

from __future__ import annotations

from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "compare_checkpoints.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs_headless_against_tiny_runs(tiny_runs, mteb_dir, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    from tests.helpers import make_fake_sweep

    # The kernel inherits the environment: the notebook's parameters, and this checkout's `gist`.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("GIST_LOG_DIR", str(tiny_runs))
    monkeypatch.setenv("GIST_DATA_DIR", str(mteb_dir))
    monkeypatch.setenv("GIST_TASK_NAME", "tiny")
    monkeypatch.setenv("GIST_ABLATION_SWEEP", str(make_fake_sweep(tmp_path)))  # hand-picked scores
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the per-task bar chart, the training curves, the ablation chart
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # The score table: every task, the base model and both checkpoints of both runs.
    for needle in (
        "| TinySTS |",
        "| TinyTopicClassification |",
        "| mean |",
        "tiny/2026-01-01_00-00-00 base",
        "tiny/2026-01-02_00-00-00-0 last",
    ):
        assert needle in text
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

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


def test_notebook_runs_headless_against_tiny_runs(tiny_runs, mteb_dir, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits the environment: the notebook's parameters, and this checkout's `gist`.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("GIST_LOG_DIR", str(tiny_runs))
    monkeypatch.setenv("GIST_DATA_DIR", str(mteb_dir))
    monkeypatch.setenv("GIST_TASK_NAME", "tiny")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the per-task bar chart and the training curves
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # The score table: every task, the base model and both checkpoints of both runs.
    for needle in ("| TinySTS |", "| TinyTopicClassification |", "| mean |", "tiny/2026-01-01_00-00-00 base",
                   "tiny/2026-01-02_00-00-00-0 last"):
        assert needle in text
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "tiny/2026-01-02_00-00-00-0" in html  # the runs table

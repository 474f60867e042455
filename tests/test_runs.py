"""gist.evaluation.runs on real (tiny) runs made by gist.train.train: listing, metrics, models, evaluation results."""

from __future__ import annotations

import json

import pytest
import torch

from gist.evaluation.harness import main_scores
from gist.evaluation.runs import is_run_dir, list_runs, load_run, runs_table
from gist.evaluation.tasks import load_tasks


def test_list_runs_finds_single_runs_and_multirun_jobs_in_order(tiny_runs, tmp_path):
    runs = list_runs(tiny_runs)
    assert [r.id for r in runs] == ["tiny/2026-01-01_00-00-00", "tiny/2026-01-02_00-00-00-0"]
    assert [r.is_multirun_job for r in runs] == [False, True]
    assert [r.name for r in list_runs(tiny_runs, tags=["sweep"])] == ["2026-01-02_00-00-00-0"]
    assert list_runs(tiny_runs, task_name="quickstart") == [] and list_runs(tmp_path) == []
    single, job = runs
    assert single.tags == ["tiny", "single"] and job.config.optim.lr == 3e-3


def test_run_exposes_config_metrics_checkpoints_and_model(tiny_runs):
    run = list_runs(tiny_runs)[0]
    metrics = run.metrics()
    for name in ("train/loss", "train/masked_frac", "val/stsb_spearman", "step"):
        assert name in metrics.columns
    assert metrics["train/loss"].notna().sum() >= 3 and metrics["val/stsb_spearman"].notna().sum() == 2
    assert [c.step for c in run.checkpoints] == sorted(c.step for c in run.checkpoints)
    # `last` is ordered by the step stored in it. (Lightning 2.6 refreshes last.ckpt only when a top-k
    # checkpoint is saved in the same step, so it need not be the final step: LOG.md.)
    last = run.checkpoint("last")
    assert run.checkpoints[-1] == last
    assert last.step == torch.load(last.path, map_location="cpu", weights_only=True)["global_step"]
    best = run.checkpoint("best")
    assert best.label.startswith("step") and run.exported_step() == best.step
    assert run.model_dir is not None and is_run_dir(run.path)
    table = runs_table(list_runs(tiny_runs))
    assert list(table["id"]) == [r.id for r in list_runs(tiny_runs)] and table["exported"].all()
    assert set(table.columns) >= {"tags", "model", "loss", "lr", "best_val_spearman", "checkpoints", "evaluated"}
    with pytest.raises(FileNotFoundError, match="no checkpoint 'step999'"):
        run.checkpoint("step999")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tiny_runs)


def test_load_model_rebuilds_checkpoints_and_the_exported_model(tiny_runs):
    from sentence_transformers import SentenceTransformer

    run = list_runs(tiny_runs)[0]
    texts = ["the cat plays piano", "my bank card is not working"]
    exported = SentenceTransformer(str(run.model_dir)).encode(texts, convert_to_tensor=True).cpu()
    torch.testing.assert_close(run.load_model().encode(texts), exported, atol=1e-5, rtol=1e-4)
    best = run.load_model("best").encode(texts)
    torch.testing.assert_close(best, exported, atol=1e-5, rtol=1e-4)  # train.py exports the best checkpoint
    last = run.load_model("last")
    state = torch.load(run.checkpoint("last").path, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(
        last.state_dict()["model.embeddings.word_embeddings.weight"],
        state["student.model.embeddings.word_embeddings.weight"],
    )
    from gist.evaluation.harness import run_model

    model = run_model(run, "last")
    step = run.checkpoint("last").step
    assert model.name == run.id and model.revision.startswith(f"step{step}-") and model.step == step


def test_results_come_from_the_end_of_run_comparison_and_further_evaluations(tiny_runs, mteb_dir):
    run = list_runs(tiny_runs)[1]
    results = run.results()
    assert {"base", "fine_tuned"} <= set(results)  # written by train.py's end-of-run comparison
    assert sorted(results["base"]) == ["TinySTS", "TinyTopicClassification"]
    comparison = json.loads((run.path / "eval" / "comparison.json").read_text())
    assert {r["task"]: r["fine_tuned"] for r in comparison["rows"][:-1]} == pytest.approx(
        results["fine_tuned"], abs=1e-3
    )
    assert run.details("fine_tuned")["model"]["step"] == run.exported_step()

    from gist.evaluation.harness import evaluate_run

    tasks = load_tasks(mteb_dir)
    after = evaluate_run(run, tasks)  # base is already there; checkpoints are scored unless the notebook did it
    assert sorted(after) == sorted(["base", "fine_tuned", *[c.label for c in run.checkpoints]])
    # The best checkpoint is the exported model: same weights, same scores.
    assert after[run.checkpoint("best").label] == pytest.approx(after["fine_tuned"], abs=1e-6)
    mtime = (run.path / "eval" / "last.json").stat().st_mtime_ns
    evaluate_run(run, tasks)  # nothing missing: nothing re-evaluated
    assert (run.path / "eval" / "last.json").stat().st_mtime_ns == mtime
    details = run.details("last")
    assert details["model"]["revision"].startswith(f"step{run.checkpoint('last').step}-")
    assert main_scores(details) == after["last"]


def test_evaluating_a_run_dir_files_results_in_the_run(tiny_runs, mteb_dir):
    from gist.evaluation.cli import evaluate_model

    run = list_runs(tiny_runs)[0]
    scores = evaluate_model(str(run.path), checkpoint="last", data_dir=mteb_dir, tasks=["TinySTS"])
    assert json.loads((run.path / "eval" / "last.json").read_text()) == scores
    assert run.details("last")["model"]["name"] == run.id
    best = run.checkpoint("best").label
    evaluate_model(str(run.path), checkpoint="best", data_dir=mteb_dir, tasks=["TinySTS"])
    assert run.details(best)["model"]["step"] == run.checkpoint("best").step  # filed under the file name


def test_train_steps_split_the_logged_training_loss_by_task(tiny_runs):
    """The default TrainSteps callback (conf/callbacks/default.yaml): every batch's task, and the loss
    metrics.csv logged at the same step (log_every_n_steps=1 here)."""
    for run in list_runs(tiny_runs):
        losses = run.task_losses()
        assert list(losses["step"]) == [0, 1, 2, 3]
        assert set(losses["task"]) <= {"task-a", "task-b", "pairs"}
        logged = run.metrics()[["step", "train/loss"]].dropna().set_index("step")["train/loss"]
        assert losses.set_index("step")["loss"].to_dict() == pytest.approx(logged.to_dict(), rel=1e-6)

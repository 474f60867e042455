"""The MTEB harness: task folders as mteb tasks (protocol kept), the encoder wrapper, model identity and
the result cache, scripts/eval.py's command line (gist.evaluation.cli); and the published all-MiniLM-L6-v2 score through all of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from gist.core.encoder import Encoder
from gist.data.records import DataError
from gist.evaluation.cli import evaluate_model
from gist.evaluation.cli import main as eval_main
from gist.evaluation.harness import (
    EvalModel,
    _mteb_wrapper,
    compare,
    encoder_model,
    evaluate,
    main_scores,
    markdown_table,
    pretrained_model,
    resolve_model,
    write_results,
)
from gist.evaluation.tasks import load_tasks, local_task, task_dirs
from gist.infra.offline_models import MINILM, installed
from tests.helpers import DATA


def copy_task(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- task folders -> mteb tasks ------------------------------------------------------------------------


def test_shipped_folders_subclass_mtebs_own_tasks_and_keep_their_protocol():
    import mteb

    tasks = {t.metadata.name: t for t in load_tasks(DATA)}
    assert sorted(tasks) == [
        "AmazonCounterfactualClassification",
        "Banking77Classification",
        "EmotionClassification",
        "STSBenchmark",
        "SciFact",
        "TweetSentimentExtractionClassification",
    ]
    for name, task in tasks.items():
        assert isinstance(task, type(mteb.get_task(name)))  # mteb's class: its protocol, not a metadata copy
        assert task.metadata == mteb.get_task(name).metadata and list(task.eval_splits) == ["test"]
    # samples_per_label is a CLASS attribute of each mteb task (a metadata-only copy would use 8).
    assert [
        tasks[n].samples_per_label
        for n in (
            "Banking77Classification",
            "EmotionClassification",
            "AmazonCounterfactualClassification",
            "TweetSentimentExtractionClassification",
        )
    ] == [8, 16, 32, 32]
    assert tasks["AmazonCounterfactualClassification"].hf_subsets == ["en"]  # meta.json subset


def test_local_data_keeps_rows_and_order_including_the_empty_tweet():
    task = local_task(DATA / "TweetSentimentExtractionClassification")
    task.load_data()
    train = task.dataset["train"]
    rows = [json.loads(line) for line in (DATA / "TweetSentimentExtractionClassification" / "train.jsonl").open()]
    assert len(train) == len(rows) == 27481 and train[314]["text"] == "" == rows[314]["text"]
    assert train["label"][:50] == [r["label"] for r in rows[:50]]
    assert sorted(task.dataset) == ["test", "train"]


def test_a_new_folder_with_an_unseen_name_is_a_generic_task_of_its_meta_type(tmp_path, mteb_dir):
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.sts import AbsTaskSTS

    sts = local_task(copy_task(mteb_dir / "TinySTS", tmp_path / "BrandNewSimilarity"))
    clf = local_task(copy_task(mteb_dir / "TinyTopicClassification", tmp_path / "BrandNewTopics"))
    assert isinstance(sts, AbsTaskSTS) and sts.metadata.name == "BrandNewSimilarity" and sts.metadata.type == "STS"
    assert isinstance(clf, AbsTaskClassification) and clf.samples_per_label == 8  # mteb's default protocol
    assert [d.name for d in task_dirs(tmp_path)] == ["BrandNewSimilarity", "BrandNewTopics"]


def test_bad_task_folders_fail_with_the_file_and_row(tmp_path, mteb_dir):
    bad_type = copy_task(mteb_dir / "TinySTS", tmp_path / "BadType")
    (bad_type / "meta.json").write_text(json.dumps({"type": "Regression"}))
    with pytest.raises(DataError, match=r"BadType/meta.json: 'type' must be one of"):
        local_task(bad_type)
    no_test = copy_task(mteb_dir / "TinySTS", tmp_path / "NoTest")
    (no_test / "test.jsonl").unlink()
    with pytest.raises(DataError, match=r"NoTest/test.jsonl: file not found"):
        local_task(no_test)
    bad_row = copy_task(mteb_dir / "TinySTS", tmp_path / "BadRow")
    lines = (bad_row / "test.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"sentence1": "a", "score": 1.0})
    (bad_row / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"BadRow/test.jsonl: row 3: missing column 'sentence2'"):
        local_task(bad_row).load_data()
    with pytest.raises(FileNotFoundError, match="no task folder"):
        load_tasks(mteb_dir, ["NotThere"])


# --- the model side -------------------------------------------------------------------------------------


def test_wrapper_returns_encoder_embeddings_in_input_order_with_duplicates(tiny_student):
    from torch.utils.data import DataLoader

    enc = Encoder(str(tiny_student)).eval()
    texts = ["the cat plays piano", "dog", "the cat plays piano", "my bank card is not working", "dog"]
    loader = DataLoader(
        [{"text": t} for t in texts], batch_size=2, collate_fn=lambda b: {"text": [x["text"] for x in b]}
    )
    wrapper = _mteb_wrapper(pretrained_model(enc))
    out = wrapper.encode(loader, task_metadata=None, hf_split="test", hf_subset="default", batch_size=2)
    assert out.shape == (5, enc.dim) and wrapper.texts == 3  # each distinct text encoded once
    torch.testing.assert_close(torch.from_numpy(out), enc.encode(texts), atol=1e-5, rtol=1e-4)


def test_sts_score_is_mtebs_spearman_of_our_cosines(tiny_student, mteb_dir):
    """Cross-check of the wiring (pairs stay aligned), not a second implementation used anywhere."""
    enc = Encoder(str(tiny_student)).eval()
    details = evaluate(pretrained_model(enc), load_tasks(mteb_dir, ["TinySTS"]))
    rows = [json.loads(line) for line in (mteb_dir / "TinySTS" / "test.jsonl").open()]
    cos = (enc.encode([r["sentence1"] for r in rows]) * enc.encode([r["sentence2"] for r in rows])).sum(-1)
    expected = 100 * spearmanr(cos.numpy(), [r["score"] for r in rows]).statistic
    assert details["tasks"]["TinySTS"]["main_score"] == pytest.approx(expected, abs=1e-6)
    assert np.isfinite(expected) and abs(expected) > 1e-3  # a real, non-degenerate correlation


def test_every_model_gets_an_explicit_name_and_revision(tiny_student, tmp_path):
    enc = Encoder(str(tiny_student))
    folder = pretrained_model(enc)
    assert folder.name == f"local/{tiny_student.name}" and len(folder.revision) == 12
    assert resolve_model(str(tiny_student)).revision == folder.revision  # same weights, same revision
    changed = Encoder(str(tiny_student))
    with torch.no_grad():
        changed.model.embeddings.word_embeddings.weight[5] += 1.0
    assert encoder_model(changed, name="x/y", step=7).revision.startswith("step7-")
    assert encoder_model(changed).revision != folder.revision  # a changed weight is a new revision
    with pytest.raises(ValueError, match="needs a run directory"):
        resolve_model(str(tiny_student), checkpoint="last")


@pytest.mark.skipif(not installed()[MINILM], reason="offline models not laid out (make setup)")
def test_a_hub_model_is_filed_under_its_commit():
    model = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(model.revision) == 40 and all(c in "0123456789abcdef" for c in model.revision)


def test_result_cache_never_mixes_models_or_data(tiny_student, mteb_dir, tmp_path):
    cache = tmp_path / "cache"
    base = Encoder(str(tiny_student)).eval()
    other = Encoder(str(tiny_student)).eval()
    with torch.no_grad():
        for p in other.model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    same_name = [EvalModel(e, "org/same-name", encoder_model(e).revision) for e in (base, other)]
    first = evaluate(same_name[0], load_tasks(mteb_dir), cache_dir=cache)
    second = evaluate(same_name[1], load_tasks(mteb_dir), cache_dir=cache)
    assert not any("cached" in t for t in second["tasks"].values())  # other weights: other revision, no reuse
    assert main_scores(first) != main_scores(second)
    again = evaluate(same_name[0], load_tasks(mteb_dir), cache_dir=cache)
    assert all("cached" in t for t in again["tasks"].values()) and main_scores(again) == main_scores(first)
    # Same task name, different data: not reused.
    moved = copy_task(mteb_dir / "TinySTS", tmp_path / "data" / "TinySTS")
    (moved / "test.jsonl").write_text("".join((moved / "test.jsonl").read_text().splitlines(keepends=True)[:-3]))
    changed = evaluate(same_name[0], load_tasks(tmp_path / "data"), cache_dir=cache)
    assert "cached" not in changed["tasks"]["TinySTS"]


def test_results_files_and_comparison_table(tmp_path):
    details = {"model": {"name": "a/b"}, "tasks": {"X": {"main_score": 81.234567}, "Y": {"main_score": 40.0}}}
    scores, full = write_results(details, tmp_path / "out" / "x.json")
    assert json.loads(scores.read_text()) == {"X": 81.2346, "Y": 40.0}
    assert full.name == "x.details.json" and json.loads(full.read_text())["model"]["name"] == "a/b"
    rows = compare({"X": 80.0, "Y": 40.0}, {"X": 82.5, "Y": 39.0})
    assert rows[-1] == {"task": "mean", "base": 60.0, "fine_tuned": 60.75, "delta": 0.75}
    table = markdown_table(rows)
    assert "| X | 80.00 | 82.50 | +2.50 |" in table and "| Y | 40.00 | 39.00 | -1.00 |" in table


def test_eval_cli_writes_scores_and_details(tiny_student, mteb_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    scores = eval_main(
        [
            f"model={tiny_student}",
            f"data_dir={mteb_dir}",
            "tasks=[TinySTS,TinyTopicClassification]",
            f"output={out}",
            "batch_size=8",
        ]
    )
    assert json.loads(out.read_text()) == scores and sorted(scores) == ["TinySTS", "TinyTopicClassification"]
    assert all(-100 <= s <= 100 for s in scores.values())
    details = json.loads((tmp_path / "scores.details.json").read_text())
    assert details["mteb_version"] and details["model"]["name"] == f"local/{tiny_student.name}"
    assert details["model"]["revision"] and details["batch_size"] == 8
    clf = details["tasks"]["TinyTopicClassification"]
    assert {"accuracy", "f1", "scores_per_experiment"} <= set(clf["scores"]["test"][0])
    assert clf["protocol"]["samples_per_label"] == 8 and clf["protocol"]["n_experiments"] == 10
    printed = capsys.readouterr().out
    assert "| TinySTS |" in printed and str(out) in printed
    with pytest.raises(SystemExit, match="output=<file.json> is required"):
        eval_main([f"model={tiny_student}", f"data_dir={mteb_dir}"])
    with pytest.raises(SystemExit, match="bad arguments"):
        eval_main([f"model={tiny_student}", "no_such_option=1"])
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE is set"):  # hub tasks need the network
        eval_main([f"model={tiny_student}", "tasks=[STSBenchmark]", f"output={out}"])


# Slow (about 60 s): tests/test_reproduction.py (slow) reproduces every published score; the default tier
# checks the harness's wiring on the tiny models (test_sts_score_is_mtebs_spearman_of_our_cosines, the CLI above).
@pytest.mark.slow
@pytest.mark.skipif(not installed()[MINILM], reason="offline models not laid out (make setup)")
def test_minilm_stsbenchmark_test_reproduces_the_published_score_through_the_harness(tmp_path):
    scores = evaluate_model(
        "sentence-transformers/all-MiniLM-L6-v2", data_dir=DATA, tasks=["STSBenchmark"], output=tmp_path / "minilm.json"
    )
    published = json.loads((DATA / "reference_scores.json").read_text())["scores"][
        "sentence-transformers/all-MiniLM-L6-v2"
    ]
    assert published["STSBenchmark"] == 82.03
    assert scores["STSBenchmark"] == pytest.approx(82.03, abs=0.05)

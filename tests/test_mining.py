"""Triplet mining (GISTEmbed paper, arXiv:2402.16829; its author's mining script): procedure properties and determinism."""

from __future__ import annotations

import json

import pytest
import torch

from gist.data.mining import MinedTriplets, StsPairs, mine_triplets, read_classification, task_slug

pytestmark = pytest.mark.unit


def test_task_slug_matches_gist_names():
    assert task_slug("Banking77Classification") == "banking77"
    assert task_slug("AmazonCounterfactualClassification") == "amazon_counterfactual"
    assert task_slug("TweetSentimentExtractionClassification") == "tweet_sentiment_extraction"
    assert task_slug("EmotionClassification") == "emotion"


def test_mining_picks_same_label_positive_and_other_label_negative():
    g = torch.Generator().manual_seed(0)
    texts = [f"t{i}" for i in range(30)] + ["alone"]
    labels = [i % 3 for i in range(30)] + [9]
    emb = torch.nn.functional.normalize(torch.randn(31, 8, generator=g), dim=-1)
    rows = mine_triplets(emb, texts, labels, seed=1029)
    label = dict(zip(texts, labels))
    assert len(rows) == 30  # the singleton class is dropped
    for q, p, n in rows:
        assert label[q] == label[p] and label[q] != label[n] and q != p


def test_positive_sampling_follows_similarity():
    """With temperature 0.05 the nearest same-label text wins almost always."""
    texts = ["a0", "a1", "a2", "b0", "b1"]
    emb = torch.tensor([[1.0, 0.0], [0.999, 0.045], [0.0, 1.0], [-1.0, 0.0], [-0.9, 0.4]])
    emb = torch.nn.functional.normalize(emb, dim=-1)
    picks = [mine_triplets(emb, texts, [0, 0, 0, 1, 1], seed=s)[0][1] for s in range(20)]
    assert picks.count("a1") >= 19


def test_rows_with_query_equal_to_positive_are_dropped():
    emb = torch.nn.functional.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    rows = mine_triplets(emb, ["same", "same", "x", "y"], [0, 0, 1, 1], seed=1)
    assert all(q != p for q, p, _ in rows)
    assert len(rows) == 2


def test_mining_is_deterministic_and_cached(tmp_path, mteb_dir, tiny_guide):
    task = mteb_dir / "TinyTopicClassification"
    miner = MinedTriplets(str(task), guide=str(tiny_guide), seed=1029)
    first = miner.materialize(tmp_path / "a").read_text()
    second = MinedTriplets(str(task), guide=str(tiny_guide), seed=1029).materialize(tmp_path / "b").read_text()
    assert first == second
    other = MinedTriplets(str(task), guide=str(tiny_guide), seed=7).materialize(tmp_path / "c").read_text()
    assert other != first
    rows = [json.loads(line) for line in first.splitlines()]
    assert {r["task_name"] for r in rows} == {"mteb-tiny_topic-avs_triplets"}
    assert set(rows[0]) == {
        "query",
        "pos",
        "neg",
        "task_name",
        "query_instruct",
        "pos_instruct",
        "neg_instruct",
        "symmetric",
    }
    texts, _ = read_classification(task)
    assert "   " not in texts and "lonely singleton" in texts  # empty text skipped; singleton read, then dropped
    assert all(r["query"] != "lonely singleton" for r in rows)
    # Cached: a second materialize does not re-mine (the file is untouched).
    path = miner.materialize(tmp_path / "a")
    mtime = path.stat().st_mtime_ns
    assert (
        MinedTriplets(str(task), guide=str(tiny_guide), seed=1029).materialize(tmp_path / "a").stat().st_mtime_ns
        == mtime
    )


def test_subsampling_is_seeded(tmp_path, mteb_dir, tiny_guide):
    task = str(mteb_dir / "TinyTopicClassification")
    a = MinedTriplets(task, guide=str(tiny_guide), max_texts=20).materialize(tmp_path / "a").read_text()
    b = MinedTriplets(task, guide=str(tiny_guide), max_texts=20).materialize(tmp_path / "b").read_text()
    assert a == b and len(a.splitlines()) <= 20


def test_sts_pairs_keep_high_scores_as_symmetric_pairs(tmp_path, mteb_dir):
    rows = StsPairs(str(mteb_dir / "TinySTS"), min_score=4.0).build()
    src = [json.loads(line) for line in (mteb_dir / "TinySTS" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == sum(r["score"] >= 4.0 for r in src) > 0
    assert all(r["symmetric"] and r["neg"] is None and r["task_name"] == "tiny_sts-pairs" for r in rows)


def test_cli_writes_the_same_rows_as_the_library(tmp_path, mteb_dir, tiny_guide):
    from gist.data.mining import main  # scripts/mine_triplets.py

    task = str(mteb_dir / "TinyTopicClassification")
    assert main(["--task-dir", task, "--out", str(tmp_path / "out.jsonl"), "--guide", str(tiny_guide)]) == 0
    lib = MinedTriplets(task, guide=str(tiny_guide)).materialize(tmp_path / "cache").read_text()
    assert (tmp_path / "out.jsonl").read_text() == lib

"""The quickstart end to end with the real offline encoders (slow). The published-score reproduction is
in tests/test_evaluation.py (STSBenchmark, default run) and tests/test_reproduction.py (all, slow)."""

from __future__ import annotations

import json

import pytest

from gist.infra.offline_models import installed
from tests.helpers import as_job, assert_run_files, load

pytestmark = pytest.mark.skipif(not all(installed().values()), reason="offline models not laid out (make setup)")


@pytest.mark.slow
def test_quickstart_end_to_end_with_real_models(tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from gist.train import train

    cfg = load(
        [
            "mining.max_texts=48",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "logger=csv",
            "trainer.log_every_n_steps=1",
        ]
    )
    metric = train(as_job(cfg, tmp_path))
    assert_run_files(tmp_path / "run", evaluation=True)
    assert 0.8 < metric < 0.95  # MiniLM's STSB validation Spearman is ~0.87 before and after a few steps
    out = capsys.readouterr().out
    # The end-of-run table: base vs fine-tuned on the five shipped tasks; the base row is the published score.
    assert "MTEB main score x100: base sentence-transformers/all-MiniLM-L6-v2@" in out
    assert "| STSBenchmark | 82.03 |" in out and "| Banking77Classification | 80.04 |" in out
    rows = json.loads((tmp_path / "run" / "eval" / "comparison.json").read_text())["rows"]
    assert [r["task"] for r in rows] == [
        "AmazonCounterfactualClassification",
        "Banking77Classification",
        "EmotionClassification",
        "STSBenchmark",
        "SciFact",
        "TweetSentimentExtractionClassification",
        "mean",
    ]
    assert "| SciFact | 64.51 |" in out  # the base's published nDCG@10
    mined = sorted(p.name.split("-avs")[0] for p in (tmp_path / "cache" / "mined").glob("*.jsonl"))
    assert mined == ["mteb-amazon_counterfactual", "mteb-banking77", "mteb-emotion", "mteb-tweet_sentiment_extraction"]
    emb = SentenceTransformer(str(tmp_path / "run" / "model")).encode(["a cat", "a dog"])
    assert emb.shape == (2, 384)
    # The model card: the base model (and its revision), the guide, the loss, the scores, the citation.
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert "Guide: `sentence-transformers/all-mpnet-base-v2`" in card and "Loss: `GISTLoss`" in card
    assert "| STSBenchmark | 82.03 |" in card and "solatorio2024gistembed" in card

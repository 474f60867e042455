"""Train/eval leakage: normalisation, a planted leak is found (exact and near, jsonl and parquet), the
quickstart's derived training data has no evaluation text, and mining drops evaluation texts."""

from __future__ import annotations

import json
import shutil

import pytest
from hydra.utils import instantiate

from gist.data.leakage import eval_texts, find_overlap, normalize, training_files, training_texts
from gist.data.leakage import main as check_leakage
from gist.data.mining import MinedTriplets, StsPairs
from gist.data.records import DataError
from tests.helpers import DATA, load, write_jsonl


@pytest.mark.unit
def test_normalize_makes_near_duplicates_equal():
    assert normalize("  Good morning,   WORLD!! ") == normalize("good morning world") == "good morning world"
    assert normalize("well-known") == normalize("well known")
    assert normalize("Ｆｕｌｌ width") == "full width"  # NFKC
    assert normalize("...") == "" and normalize("cat") != normalize("cats")


def test_a_planted_leak_is_reported_with_file_and_row(tmp_path, capsys):
    sts = json.loads((DATA / "STSBenchmark" / "test.jsonl").open().readline())
    tweet = [json.loads(line) for line in (DATA / "TweetSentimentExtractionClassification" / "test.jsonl").open()][10][
        "text"
    ]
    near = tweet.upper() + " !!"
    write_jsonl(
        tmp_path / "clean.jsonl",
        [{"query": "a question nobody asked", "pos": "an answer", "neg": "", "task_name": "t"}],
    )
    write_jsonl(
        tmp_path / "leaky.jsonl",
        [
            {"query": "fine", "pos": "also fine", "neg": "still fine", "task_name": "t"},
            {"query": "ok", "pos": sts["sentence1"], "neg": near, "task_name": "t"},
        ],
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"query": ["x y z"], "pos": [sts["sentence1"]], "neg": ["q"], "task_name": ["t"]}),
        tmp_path / "leaky.parquet",
    )

    report = find_overlap(
        training_texts([tmp_path / "clean.jsonl", tmp_path / "leaky.jsonl", tmp_path / "leaky.parquet"]),
        eval_texts(DATA),
    )
    sts_split = report.tasks["STSBenchmark/test"]
    tweet_split = report.tasks["TweetSentimentExtractionClassification/test"]
    assert (sts_split.exact, sts_split.near, sts_split.training_rows) == (1, 0, 2)
    assert (tweet_split.exact, tweet_split.near) == (0, 1)
    assert report.total_exact == 1 and report.total_near == 1 and not report.clean
    assert sts_split.examples[0]["train"] == f"{tmp_path / 'leaky.jsonl'}: row 2, pos"
    assert sts_split.examples[0]["eval"].endswith("STSBenchmark/test.jsonl: row 1, sentence1")
    assert tweet_split.examples[0]["train_text"] == near

    out = tmp_path / "report.json"
    assert check_leakage([str(tmp_path), "--data-dir", str(DATA), "--fail-on-overlap", "--output", str(out)]) == 1
    assert "OVERLAP: 1 exact, 1 near" in capsys.readouterr().out
    assert json.loads(out.read_text())["tasks"]["STSBenchmark/test"]["exact"] == 1
    assert check_leakage([str(tmp_path / "leaky.jsonl"), "--data-dir", str(DATA)]) == 0  # report only
    assert check_leakage([str(tmp_path / "clean.jsonl"), "--data-dir", str(DATA), "--fail-on-overlap"]) == 0


@pytest.mark.unit
def test_training_inputs_are_files_or_folders_searched_recursively(tmp_path):
    row = [{"query": "q", "pos": "p", "neg": "", "task_name": "t"}]
    nested, top = write_jsonl(tmp_path / "d" / "sub" / "a.jsonl", row), write_jsonl(tmp_path / "d" / "b.jsonl", row)
    (tmp_path / "d" / "notes.txt").write_text("not training data")
    assert training_files([tmp_path / "d", nested]) == [top, nested, nested]
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        training_files([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no .jsonl or .parquet files"):
        training_files([tmp_path / "empty"])


@pytest.mark.unit
def test_bad_training_rows_fail_with_file_and_row(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"query": "fine", "pos": "fine"}, {"query": 3, "pos": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: column 'query' must be a string"):
        list(training_texts([tmp_path / "bad.jsonl"]))


def test_the_quickstart_training_data_has_no_test_split_text(tmp_path, tiny_guide, capsys):
    """The quickstart's own derived sources and exclusion setting (mining with a tiny guide instead of
    mpnet, 200 texts per task instead of 600 to stay fast), checked against every test split of data/mteb."""
    cfg = load(
        [
            f"mining.guide={tiny_guide}",
            "mining.guide_max_length=32",
            "mining.max_texts=200",
            f"paths.cache_dir={tmp_path}",
        ]
    )
    assert cfg.mining.exclude_eval_of.endswith("data/mteb")
    sources = [s for d in instantiate(cfg.data.derived, _convert_="all") for s in (d if isinstance(d, list) else [d])]
    files = [s.materialize(tmp_path) for s in sources]
    assert len(files) == 5 and all(sum(1 for _ in f.open()) > 100 for f in files)
    assert (
        check_leakage(
            [
                str(tmp_path / "mined"),
                str(tmp_path / "derived"),
                "--data-dir",
                str(DATA),
                "--splits",
                "test",
                "--fail-on-overlap",
            ]
        )
        == 0
    )
    assert "no overlap" in capsys.readouterr().out
    # Without the exclusion the same STS pairs DO contain test sentences: the check above can fail.
    raw = StsPairs(str(DATA / "STSBenchmark"), min_score=4.0).materialize(tmp_path / "raw")
    report = find_overlap(training_texts([raw]), eval_texts(DATA, ["test"], ["STSBenchmark"]))
    assert report.tasks["STSBenchmark/test"].exact > 50


@pytest.mark.unit
def test_mining_drops_evaluation_texts_before_mining(tmp_path, mteb_dir, tiny_guide):
    data = tmp_path / "data"
    shutil.copytree(mteb_dir, data)
    train = [json.loads(line) for line in (data / "TinyTopicClassification" / "train.jsonl").open()]
    planted = train[3]["text"]
    with (data / "TinyTopicClassification" / "test.jsonl").open("a") as f:
        f.write(json.dumps({"text": planted.upper() + "!", "label": train[3]["label"]}) + "\n")
    task = str(data / "TinyTopicClassification")
    kept = MinedTriplets(task, guide=str(tiny_guide)).build()
    dropped = MinedTriplets(task, guide=str(tiny_guide), exclude_eval_of=str(data)).build()
    assert any(planted in (r["query"], r["pos"], r["neg"]) for r in kept)
    assert not any(planted in (r["query"], r["pos"], r["neg"]) for r in dropped)
    # The cache key follows the exclusion, so a cached unfiltered file is never reused for a filtered run.
    assert MinedTriplets(task, guide=str(tiny_guide)).cache_path(tmp_path) != MinedTriplets(
        task, guide=str(tiny_guide), exclude_eval_of=str(data)
    ).cache_path(tmp_path)

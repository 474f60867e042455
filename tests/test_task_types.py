"""Task folders of every main MTEB type, evaluated by mteb's own task classes: tiny made-up folders in
each layout (Retrieval in BEIR's, Reranking, PairClassification, Clustering, Summarization), a known name
keeping mteb's class (SummEval), and bad input failing with the file and row."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gist.data.records import DataError
from gist.evaluation.tasks import load_tasks, local_task
from tests.helpers import sentence, write_jsonl

pytestmark = pytest.mark.unit


def _meta(folder: Path, **meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def make_retrieval(folder: Path, rng: random.Random, docs: int = 12, queries: int = 4) -> Path:
    _meta(folder, type="Retrieval")
    write_jsonl(folder / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": sentence(rng, 8)} for i in range(docs)])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": sentence(rng, 4)} for i in range(queries + 1)])
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{(3 * i + j) % docs}\t1" for i in range(queries) for j in (0, 1)]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")  # q<queries> has no judgement
    return folder


def make_folders(root: Path) -> Path:
    rng = random.Random(0)
    make_retrieval(root / "TinyRetrieval", rng)
    write_jsonl(
        _meta(root / "TinyReranking", type="Reranking") / "test.jsonl",
        [
            {"query": sentence(rng, 4), "positive": [sentence(rng)], "negative": [sentence(rng) for _ in range(3)]}
            for _ in range(4)
        ],
    )
    write_jsonl(
        _meta(root / "TinyPairClassification", type="PairClassification") / "test.jsonl",
        [{"sentence1": sentence(rng), "sentence2": sentence(rng), "label": i % 2} for i in range(10)],
    )
    write_jsonl(
        _meta(root / "TinyClustering", type="Clustering") / "test.jsonl",
        [{"sentences": [sentence(rng) for _ in range(9)], "labels": [i % 3 for i in range(9)]} for _ in range(2)],
    )
    write_jsonl(
        _meta(root / "TinySummarization", type="Summarization", min_score=1, max_score=5) / "test.jsonl",
        [
            {
                "text": sentence(rng, 12),
                "human_summaries": [sentence(rng, 5), sentence(rng, 5)],
                "machine_summaries": [sentence(rng, 5) for _ in range(4)],
                "relevance": [1.0, 2.5, 4.0, 5.0],
            }
            for _ in range(3)
        ],
    )
    return root


@pytest.fixture(scope="module")
def type_folders(tmp_path_factory) -> Path:
    return make_folders(tmp_path_factory.mktemp("types"))


def test_each_layout_is_a_generic_task_of_its_type_evaluated_by_mteb(tiny_student, type_folders):
    from gist.core.encoder import Encoder
    from gist.evaluation.harness import evaluate, main_scores, pretrained_model

    tasks = load_tasks(type_folders)
    assert [t.metadata.type for t in tasks] == [
        "Clustering",
        "PairClassification",
        "Reranking",
        "Retrieval",
        "Summarization",
    ]
    details = evaluate(pretrained_model(Encoder(str(tiny_student))), tasks)
    scores = main_scores(details)
    assert set(scores) == {t.metadata.name for t in tasks}
    for name, score in scores.items():
        assert -100 <= score <= 100, (name, score)
    main = {name: t["main_score_name"] for name, t in details["tasks"].items()}
    assert main == {
        "TinyClustering": "v_measure",
        "TinyPairClassification": "max_ap",
        "TinyReranking": "map_at_1000",
        "TinyRetrieval": "ndcg_at_10",
        "TinySummarization": "cosine_spearman",
    }


def test_retrieval_reads_beir_and_drops_unjudged_queries(type_folders):
    task = local_task(type_folders / "TinyRetrieval")
    task.load_data()
    split = task.dataset["default"]["test"]
    assert len(split["corpus"]) == 12 and split["corpus"]["id"][:2] == ["d0", "d1"]
    assert split["queries"]["id"] == ["q0", "q1", "q2", "q3"]  # q4 has no judgement
    assert split["relevant_docs"]["q1"] == {"d3": 1, "d4": 1}


def test_reranking_gives_each_query_its_candidates_positives_first(type_folders):
    task = local_task(type_folders / "TinyReranking")
    task.load_data()
    split = task.dataset["default"]["test"]
    ranked = split["top_ranked"]["test_query0"]
    assert len(ranked) == 4 and ranked[0].startswith("apositive_")
    assert (
        split["relevant_docs"]["test_query0"][ranked[0]] == 1 and split["relevant_docs"]["test_query0"][ranked[1]] == 0
    )


def test_a_known_name_keeps_mtebs_class_summeval(tmp_path, type_folders, tiny_student):
    """A Summarization folder named SummEval is evaluated by mteb's SummEval class (its protocol)."""
    import shutil

    import mteb

    from gist.core.encoder import Encoder
    from gist.evaluation.harness import evaluate, main_scores, pretrained_model

    folder = shutil.copytree(type_folders / "TinySummarization", tmp_path / "SummEval")
    task = local_task(folder)
    assert isinstance(task, type(mteb.get_task("SummEval")))
    assert (task.min_score, task.max_score) == (
        mteb.get_task("SummEval").min_score,
        mteb.get_task("SummEval").max_score,
    )
    score = main_scores(evaluate(pretrained_model(Encoder(str(tiny_student))), [task]))["SummEval"]
    assert -100 <= score <= 100


@pytest.mark.parametrize(
    "folder,edit,message",
    [
        (
            "TinyRetrieval",
            lambda d: (d / "qrels" / "test.tsv").write_text("q\td\ts\n"),
            r"qrels/test.tsv: row 1: the header",
        ),
        (
            "TinyRetrieval",
            lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\n"),
            r"qrels/test.tsv: row 2: expected query-id, corpus-id, integer score",
        ),
        (
            "TinyRetrieval",
            lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tnope\t1\n"),
            r"corpus-ids not in corpus.jsonl: \['nope'\]",
        ),
        ("TinyRetrieval", lambda d: (d / "corpus.jsonl").unlink(), r"corpus.jsonl: file not found"),
        (
            "TinyReranking",
            lambda d: write_jsonl(d / "test.jsonl", [{"query": "q", "positive": ["p"], "negative": []}]),
            r"test.jsonl: row 1: a reranking row needs at least one positive and one negative",
        ),
        (
            "TinyPairClassification",
            lambda d: write_jsonl(d / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 2}]),
            r"test.jsonl: row 1: column 'label' must be 0 or 1",
        ),
        (
            "TinyClustering",
            lambda d: write_jsonl(d / "test.jsonl", [{"sentences": ["a", "b"], "labels": "x"}]),
            r"test.jsonl: row 1: column 'labels' has type str \(a list",
        ),
        (
            "TinySummarization",
            lambda d: write_jsonl(
                d / "test.jsonl",
                [{"text": "t", "human_summaries": ["h"], "machine_summaries": ["m", "n"], "relevance": [1.0]}],
            ),
            r"test.jsonl: row 1: 'relevance' needs one score per machine summary",
        ),
    ],
)
def test_bad_folders_fail_with_the_file_and_row(tmp_path, type_folders, folder, edit, message):
    import shutil

    bad = shutil.copytree(type_folders / folder, tmp_path / folder)
    edit(bad)
    with pytest.raises(DataError, match=message):
        local_task(bad).load_data()


def test_shipped_scifact_is_mtebs_own_task_with_beirs_counts():
    import mteb

    from tests.helpers import DATA

    task = local_task(DATA / "SciFact")
    assert isinstance(task, type(mteb.get_task("SciFact"))) and task.metadata.main_score == "ndcg_at_10"
    task.load_data()
    split = task.dataset["default"]["test"]
    assert len(split["corpus"]) == 5183 and len(split["queries"]) == 300
    assert sum(len(docs) for docs in split["relevant_docs"].values()) == 339

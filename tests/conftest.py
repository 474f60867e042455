"""Shared fixtures: offline environment, tiny random BERTs, and small GIST / MTEB-layout data. The plain
functions they are built from (and that tests call directly) are in tests/helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    make_tiny_bert,
    make_tiny_decoder,
    make_tiny_mpnet,
    sentence,
    set_test_environment,
    tiny_cfg,
    write_jsonl,
)

set_test_environment()


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "student", hidden=32, pooling="mean", seed=0)


@pytest.fixture(scope="session")
def tiny_guide(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "guide", hidden=48, pooling="cls", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A random Qwen3 (rotary, left padding, EOS appended, pad id != 0) with last-token pooling and
    Qwen3-Embedding-style prompts."""
    prompts = {"query": "Instruct: find the text\nQuery: ", "document": ""}
    return make_tiny_decoder(tmp_path_factory.mktemp("models") / "qwen3", "qwen3", "lasttoken", prompts=prompts)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random Llama (rotary, left padding, BOS prepended, EOS as pad) with weighted-mean pooling."""
    return make_tiny_decoder(tmp_path_factory.mktemp("models") / "llama", "llama", "weightedmean")


@pytest.fixture(scope="session")
def tiny_mpnet(tmp_path_factory) -> Path:
    return make_tiny_mpnet(tmp_path_factory.mktemp("models") / "mpnet", pooling="mean")


@pytest.fixture(scope="session")
def gist_rows():
    """72 GIST-schema rows in 3 tasks (two triplet tasks, one pair task), interleaved."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(24):
        for task in ("task-a", "task-b"):
            rows.append(
                {
                    "query": f"{task} {i} " + sentence(rng),
                    "pos": sentence(rng),
                    "neg": sentence(rng),
                    "task_name": task,
                    "query_instruct": "Represent the query:",
                    "pos_instruct": "Represent the doc:",
                    "neg_instruct": "Represent the doc:",
                    "symmetric": False,
                }
            )
        rows.append(
            {
                "query": f"pair {i} " + sentence(rng),
                "pos": sentence(rng),
                "neg": "",
                "task_name": "pairs",
                "query_instruct": "",
                "pos_instruct": "",
                "neg_instruct": "",
                "symmetric": True,
            }
        )
    return rows


@pytest.fixture()
def gist_file(tmp_path, gist_rows) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", gist_rows)


@pytest.fixture(scope="session")
def mteb_dir(tmp_path_factory) -> Path:
    """A tiny MTEB-layout folder: one STS task and one classification task."""
    import random

    rng = random.Random(1)
    root = tmp_path_factory.mktemp("mteb")
    for split, n in (("train", 40), ("validation", 24), ("test", 24)):
        write_jsonl(
            root / "TinySTS" / f"{split}.jsonl",
            [
                {"sentence1": sentence(rng), "sentence2": sentence(rng), "score": round(rng.uniform(0, 5), 1)}
                for _ in range(n)
            ],
        )
    (root / "TinySTS" / "meta.json").write_text(
        json.dumps({"task": "TinySTS", "type": "STS", "min_score": 0, "max_score": 5})
    )
    labels = ["alpha", "beta", "gamma"]
    rows = [
        {"text": f"{labels[i % 3]} " + sentence(rng), "label": i % 3, "label_text": labels[i % 3]} for i in range(60)
    ]
    rows.append({"text": "lonely singleton", "label": 7, "label_text": "single"})
    rows.append({"text": "   ", "label": 0, "label_text": "alpha"})
    write_jsonl(root / "TinyTopicClassification" / "train.jsonl", rows)
    write_jsonl(
        root / "TinyTopicClassification" / "test.jsonl",
        [{"text": f"{labels[i % 3]} " + sentence(rng), "label": i % 3, "label_text": labels[i % 3]} for i in range(24)],
    )
    (root / "TinyTopicClassification" / "meta.json").write_text(
        json.dumps({"task": "TinyTopicClassification", "type": "Classification"})
    )
    return root


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_student, tiny_guide, gist_rows, mteb_dir) -> Path:
    """A log dir with two tiny training runs in Hydra's layout (4 steps each, tiny BERTs, end-of-run
    evaluation on `mteb_dir`): tiny/runs/<time>/ and the multirun job tiny/multiruns/<time>/0/."""
    from omegaconf import open_dict

    from gist.train import train

    root = tmp_path_factory.mktemp("tiny_runs")
    gist_file = write_jsonl(root / "train.jsonl", gist_rows)
    logs = root / "logs"
    layout = {
        "runs/2026-01-01_00-00-00": ["tags=[tiny,single]"],
        "multiruns/2026-01-02_00-00-00/0": ["tags=[tiny,sweep]", "optim.lr=3e-3"],
    }
    for sub, overrides in layout.items():
        cfg = tiny_cfg(root / sub, tiny_student, tiny_guide, gist_file, mteb_dir, ["task_name=tiny", *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(logs / "tiny" / sub)
            cfg.paths.cache_dir = str(root / "cache")
        metric = train(cfg)
        assert isinstance(metric, float) and -1 <= metric <= 1
        assert (logs / "tiny" / sub / "model" / "modules.json").exists()
    return logs

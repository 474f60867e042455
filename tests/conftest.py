"""Shared fixtures: offline environment, a tiny random BERT, and small GIST / MTEB-layout data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["GIST_ROOT"] = str(ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a an is are was were be to of and in on for with my your card bank money account transfer "
    "happy sad angry fear love surprise joy movie film great bad good terrible product review book "
    "cat dog man woman plays guitar piano flute runs walks eats food pizza cheese plane flying taking off "
    "i you he she it we they not very really so what how when where why can do does did please help"
).split()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_bert(path: Path, hidden: int = 32, layers: int = 2, pooling: str = "mean", seed: int = 0) -> Path:
    """A randomly initialised BERT + WordPiece tokenizer folder, with a sentence-transformers pooling config."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *"abcdefghijklmnopqrstuvwxyz.,!?'"]
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)
    # Regression: transformers 5 ignores `vocab_file=`, leaving a 5-token vocab that maps every word to
    # [UNK] (all texts embed identically and the end-to-end tests silently test nothing).
    assert tokenizer.tokenize("the cat plays piano") == ["the", "cat", "plays", "piano"]
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
    }))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return path


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "student", hidden=32, pooling="mean", seed=0)


@pytest.fixture(scope="session")
def tiny_guide(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "guide", hidden=48, pooling="cls", seed=1)


def _sentence(rng, n=6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="session")
def gist_rows():
    """72 GIST-schema rows in 3 tasks (two triplet tasks, one pair task), interleaved."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(24):
        for task in ("task-a", "task-b"):
            rows.append({"query": f"{task} {i} " + _sentence(rng), "pos": _sentence(rng), "neg": _sentence(rng),
                         "task_name": task, "query_instruct": "Represent the query:", "pos_instruct": "Represent the doc:",
                         "neg_instruct": "Represent the doc:", "symmetric": False})
        rows.append({"query": f"pair {i} " + _sentence(rng), "pos": _sentence(rng), "neg": "", "task_name": "pairs",
                     "query_instruct": "", "pos_instruct": "", "neg_instruct": "", "symmetric": True})
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
        write_jsonl(root / "TinySTS" / f"{split}.jsonl", [
            {"sentence1": _sentence(rng), "sentence2": _sentence(rng), "score": round(rng.uniform(0, 5), 1)} for _ in range(n)
        ])
    (root / "TinySTS" / "meta.json").write_text(json.dumps({"task": "TinySTS", "type": "STS", "min_score": 0, "max_score": 5}))
    labels = ["alpha", "beta", "gamma"]
    rows = [{"text": f"{labels[i % 3]} " + _sentence(rng), "label": i % 3, "label_text": labels[i % 3]} for i in range(60)]
    rows.append({"text": "lonely singleton", "label": 7, "label_text": "single"})
    rows.append({"text": "   ", "label": 0, "label_text": "alpha"})
    write_jsonl(root / "TinyTopicClassification" / "train.jsonl", rows)
    write_jsonl(root / "TinyTopicClassification" / "test.jsonl", [
        {"text": f"{labels[i % 3]} " + _sentence(rng), "label": i % 3, "label_text": labels[i % 3]} for i in range(24)
    ])
    (root / "TinyTopicClassification" / "meta.json").write_text(json.dumps({"task": "TinyTopicClassification", "type": "Classification"}))
    return root



@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_student, tiny_guide, gist_rows, mteb_dir) -> Path:
    """A log dir with two tiny training runs in Hydra's layout (4 steps each, tiny BERTs, end-of-run
    evaluation on `mteb_dir`): tiny/runs/<time>/ and the multirun job tiny/multiruns/<time>/0/."""
    from omegaconf import open_dict

    from tests.test_train import tiny_cfg, train_script

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
        train_script.train(cfg)
    return logs

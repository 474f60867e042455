"""Data: same-task batching, instructions, bad-row errors, collation with separate guide tokenization."""

from __future__ import annotations

import json

import pytest
import torch

from gist.core.inputs import TextInputs
from gist.data.batching import SameTaskBatches
from gist.data.collate import Collator
from gist.data.records import DataError, iter_rows, parse_row, text_id, validate_sources
from tests.helpers import write_jsonl

pytestmark = pytest.mark.unit


def _all_batches(sources, batch_size=8, seed=42, epoch=0, **kw):
    ds = SameTaskBatches(sources, batch_size, seed=seed, **kw)
    ds.set_epoch(epoch)
    return list(ds)


def test_every_batch_holds_one_task_and_no_row_is_lost_except_leftovers(gist_file, gist_rows):
    batches = _all_batches([gist_file], batch_size=8)
    assert all(len({r["task_name"] for r in b}) == 1 for b in batches)
    assert all(len(b) == 8 for b in batches)
    # 24 rows per task, batch 8 -> 3 batches per task, no leftovers; every row exactly once.
    assert len(batches) == 9
    seen = sorted(r["query"] for b in batches for r in b)
    assert seen == sorted(r["query"] for r in gist_rows)


def test_leftovers_are_dropped(gist_file):
    batches = _all_batches([gist_file], batch_size=10)  # 24 rows/task -> 2 batches, 4 left over per task
    assert len(batches) == 6


def test_seeded_shuffle_is_deterministic_and_changes_with_seed_and_epoch(gist_file):
    key = lambda bs: [b[0]["query"] for b in bs]  # noqa: E731
    a = key(_all_batches([gist_file], seed=1))
    assert a == key(_all_batches([gist_file], seed=1))
    assert a != key(_all_batches([gist_file], seed=2))
    assert a != key(_all_batches([gist_file], seed=1, epoch=1))
    assert sorted(a) == sorted(key(_all_batches([gist_file], seed=1, epoch=1)))
    assert len({b[0]["task_name"] for b in _all_batches([gist_file], seed=1)[:4]}) > 1  # tasks are mixed


def test_within_task_row_order_is_kept(gist_file, gist_rows):
    """GIST cuts each task's rows in stream order: a batch is consecutive rows of its task."""
    for b in _all_batches([gist_file]):
        task_rows = [r["query"] for r in gist_rows if r["task_name"] == b[0]["task_name"]]
        start = task_rows.index(b[0]["query"])
        assert [r["query"] for r in b] == task_rows[start : start + len(b)]


def test_rows_keep_their_instructions_apart_from_the_texts(gist_rows):
    row = parse_row(gist_rows[0], "x: row 1")
    assert row["query"] == gist_rows[0]["query"] and row["pos"] == gist_rows[0]["pos"]  # texts untouched
    assert row["instruct"] == {
        "query": "Represent the query:",
        "pos": "Represent the doc:",
        "neg": "Represent the doc:",
    }
    with pytest.raises(DataError, match="'query_instruct' must be a string"):
        parse_row(dict(gist_rows[0], query_instruct=3), "x: row 1")


@pytest.mark.parametrize(
    "bad_line,problem",
    [
        ('{"query": "q", "pos": "p"', "malformed JSON"),
        ('{"pos": "p", "task_name": "t"}', "missing column 'query'"),
        ('{"query": 3, "pos": "p", "task_name": "t"}', "'query' must be a string"),
        ('{"query": "   ", "pos": "p", "task_name": "t"}', "'query' is empty or whitespace-only"),
        ('{"query": "q", "pos": "p", "task_name": "t", "symmetric": "yes"}', "'symmetric' must be a boolean"),
        ('["q", "p"]', "expected a JSON object"),
    ],
)
def test_bad_row_error_names_file_row_and_problem(tmp_path, gist_rows, bad_line, problem):
    path = tmp_path / "dirty.jsonl"
    lines = [json.dumps(r) for r in gist_rows[:5]] + [bad_line] + [json.dumps(r) for r in gist_rows[5:10]]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        validate_sources([path])
    assert str(path) in str(err.value) and "row 6" in str(err.value) and problem in str(err.value)


def test_invalid_utf8_and_missing_file_are_named(tmp_path, gist_rows):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(gist_rows[0]).encode() + b"\n" + b'{"query": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl: row 2: invalid UTF-8"):
        validate_sources([path])
    with pytest.raises(DataError, match="not found"):
        validate_sources([tmp_path / "nope.jsonl"])


def test_task_mixing_rows_with_and_without_negatives_is_an_error(tmp_path, gist_rows):
    rows = [dict(gist_rows[0]), dict(gist_rows[2]), dict(gist_rows[0], neg=None)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed.jsonl: row 3: task 'task-a' lacks a 'neg'"):
        validate_sources([path])


def test_parquet_and_jsonl_give_the_same_rows(tmp_path, gist_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(gist_rows), tmp_path / "train.parquet")
    jsonl = write_jsonl(tmp_path / "train.jsonl", gist_rows)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "where"} for r in rows]  # noqa: E731
    assert strip(iter_rows([tmp_path / "train.parquet"])) == strip(iter_rows([jsonl]))


def test_collator_tokenizes_guide_separately_with_its_own_tokenizer(tiny_student, tiny_guide, gist_rows):
    from transformers import AutoTokenizer

    st, gt = AutoTokenizer.from_pretrained(tiny_student), AutoTokenizer.from_pretrained(tiny_guide)
    rows = [parse_row(r, "x") for r in gist_rows[:6] if r["task_name"] == "task-a"]
    batch = Collator(TextInputs(st, 8), TextInputs(gt, 16))(rows)
    assert set(batch.student) == {"anchor", "positive", "negative"} == set(batch.guide)
    assert batch.student["anchor"]["input_ids"].shape[1] <= 8  # student max length
    assert batch.guide["anchor"]["input_ids"].shape[1] > 8  # guide keeps its own, longer max length
    # Dynamic padding: the longest text of the batch, not max_length.
    short = Collator(TextInputs(st, 512), TextInputs(gt, 512))(
        [dict(r, query="cat", pos="dog", neg="man") for r in rows]
    )
    assert short.student["anchor"]["input_ids"].shape[1] == 3  # [CLS] cat [SEP]
    assert torch.equal(batch.text_ids["anchor"], torch.tensor([text_id(r["query"]) for r in rows]))


def test_pair_task_batches_have_no_negative(tiny_student, gist_rows):
    from transformers import AutoTokenizer

    rows = [parse_row(r, "x") for r in gist_rows if r["task_name"] == "pairs"][:4]
    batch = Collator(TextInputs(AutoTokenizer.from_pretrained(tiny_student), 16))(rows)
    assert set(batch.student) == {"anchor", "positive"} and batch.guide is None


def test_batches_are_sharded_across_workers(gist_file):
    from torch.utils.data import DataLoader

    ds = SameTaskBatches([gist_file], 8, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda b: tuple(r["query"] for r in b))
    got = sorted(loader)
    assert got == sorted(tuple(r["query"] for r in b) for b in ds)


def test_hub_dataset_streams_through_the_same_batching(tmp_path, gist_rows, monkeypatch):
    """The hub path (`datasets.load_dataset(..., streaming=True)`) yields the same batches as the files;
    the hub itself is replaced by a local parquet dataset (tests never touch the network)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gist.data.records import HubDataset

    pq.write_table(pa.Table.from_pylist(gist_rows), tmp_path / "train.parquet")
    calls = []
    real = datasets.load_dataset

    def fake_load(path, name=None, revision=None, split=None, streaming=False):
        calls.append((path, revision, split, streaming))
        return real("parquet", data_files=str(tmp_path / "train.parquet"), split=split, streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    hub = HubDataset("org/data", revision="abc123", split="train")
    from_hub = [[r["query"] for r in b] for b in _all_batches([hub])]
    from_file = [[r["query"] for r in b] for b in _all_batches([tmp_path / "train.parquet"])]
    assert from_hub == from_file and calls[0] == ("org/data", "abc123", "train", True)

"""The training stream at scale: buffer bound and policies, row-group parquet reading, weighted /
temperature mixing with caps, same-task global batches split across DDP ranks and DataLoader workers,
and the stream position (state_dict / load_state_dict) for exact resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from gist.data.batching import SameTaskBatches
from gist.data.records import DataError, iter_rows
from gist.data.sources import SourceSpec, mixture_probabilities, source_spec
from tests.helpers import write_jsonl

pytestmark = pytest.mark.unit


def _rows(n_tasks: int, per_task: int, prefix: str = "", interleave: bool = True, neg: bool = True) -> list[dict]:
    """`n_tasks` tasks of `per_task` rows; interleaved round-robin (every task scattered over the whole
    stream) or task after task."""
    order = (
        [(i, t) for i in range(per_task) for t in range(n_tasks)]
        if interleave
        else [(i, t) for t in range(n_tasks) for i in range(per_task)]
    )
    return [
        {"query": f"{prefix}t{t} q{i}", "pos": f"p {i}", "neg": f"n {i}" if neg else None, "task_name": f"{prefix}t{t}"}
        for i, t in order
    ]


def _queries(batches) -> list[tuple[str, ...]]:
    return [tuple(r["query"] for r in b) for b in batches]


# -- per-task buffers: bound and policies ---------------------------------------------------------------
def test_scattered_tasks_hold_at_most_tasks_times_global_batch_minus_one(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", _rows(n_tasks=12, per_task=20))
    ds = SameTaskBatches([path], batch_size=4, seed=0, shuffle_buffer=3, world_size=2, rank=0)
    batches = list(ds.global_batches(0, world_size=2))  # G = 8 rows per global batch
    assert all(len(b) == 8 and len({r["task_name"] for r in b}) == 1 for b in batches)
    # Every task is scattered over the whole stream: just before the first buffer fills, all 12 hold 7.
    assert ds.stats["peak_buffered_rows"] == 12 * 7
    # 20 rows per task: 2 full batches + 4 leftover rows each, dropped by default.
    assert len(batches) == 24 and ds.stats["leftover_rows"] == 12 * 4 and ds.stats["evicted_rows"] == 0
    assert ds.stats["rows"] == 8 * len(batches) + ds.stats["leftover_rows"]


def test_max_buffered_rows_evicts_the_least_recently_fed_task(tmp_path):
    # Tasks t0..t4 arrive one after another with 6 rows each (never a full batch of 8), then t5 with 16.
    rows = _rows(5, 6, interleave=False) + _rows(1, 16, prefix="late-")
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    ds = SameTaskBatches([path], batch_size=8, seed=0, max_buffered_rows=13)
    batches = list(ds.global_batches(0))
    assert ds.stats["peak_buffered_rows"] <= 13
    # Each new task pushes the oldest partial buffer out once 13 rows are held.
    assert ds.stats["evicted_rows"] > 0
    assert ds.stats["rows"] == 8 * len(batches) + ds.stats["evicted_rows"] + ds.stats["leftover_rows"]
    assert [b[0]["task_name"] for b in batches] == ["late-t0", "late-t0"]
    # Without a cap nothing is evicted and the same rows are left over instead.
    uncapped = SameTaskBatches([path], batch_size=8, seed=0)
    assert len(list(uncapped.global_batches(0))) == 2 and uncapped.stats["evicted_rows"] == 0
    assert uncapped.stats["leftover_rows"] == 30


def test_leftovers_dropped_by_default_or_emitted_split_evenly_across_ranks(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", _rows(1, 13) + _rows(1, 9, prefix="b") + _rows(1, 3, prefix="c"))
    # G = 2 ranks x 4 = 8: task t0 has 1 batch + 5 leftover rows, bt0 1 + 1, ct0 0 + 3.
    dropped = SameTaskBatches([path], 4, seed=0, world_size=2, rank=0)
    assert [len(b) for b in dropped.global_batches(0, 2)] == [8, 8] and dropped.stats["leftover_rows"] == 9
    emitted = SameTaskBatches([path], 4, seed=0, world_size=2, rank=0, leftovers="emit")
    sizes = sorted((b[0]["task_name"], len(b)) for b in emitted.global_batches(0, 2))
    # t0's 5 leftovers -> a batch of 4 (2 per rank, 1 row dropped); bt0's 1 and ct0's 3 (< 2 per rank) dropped.
    assert sizes == [("bt0", 8), ("t0", 4), ("t0", 8)]
    assert emitted.stats["emitted_leftover_batches"] == 1 and emitted.stats["leftover_rows"] == 1 + 1 + 3
    per_rank = [
        [len(b) for b in SameTaskBatches([path], 4, seed=0, world_size=2, rank=r, leftovers="emit")] for r in (0, 1)
    ]
    assert per_rank[0] == per_rank[1] and sorted(per_rank[0]) == [2, 4, 4]
    with pytest.raises(ValueError, match="leftovers"):
        SameTaskBatches([path], 4, leftovers="keep")


def test_parquet_is_read_row_group_by_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(3, 50)
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
    assert pq.ParquetFile(path).num_row_groups == 10
    got = [{k: r[k] for k in ("query", "task_name")} for r in iter_rows([path])]
    assert got == [{k: r[k] for k in ("query", "task_name")} for r in rows]
    assert [r["where"] for r in iter_rows([path])][-1] == f"{path}: row 149"


# -- mixing ------------------------------------------------------------------------------------------
def _mixture_files(tmp_path) -> list[Path]:
    return [
        write_jsonl(tmp_path / "a.jsonl", _rows(2, 1500, prefix="a-")),  # 3,000 rows
        write_jsonl(tmp_path / "b.jsonl", _rows(2, 250, prefix="b-")),  # 500 rows
    ]


def _source_shares(batches) -> dict[str, float]:
    counts = Counter(r["task_name"][0] for b in batches for r in b)
    return {k: v / sum(counts.values()) for k, v in counts.items()}


def test_weighted_mixture_realises_the_weights_and_is_reproducible(tmp_path):
    a, b = _mixture_files(tmp_path)
    specs = [SourceSpec(a, weight=1.0), SourceSpec(b, weight=3.0)]
    ds = SameTaskBatches(specs, 4, seed=7, shuffle_buffer=16)
    batches = list(ds)
    shares = _source_shares(batches)
    # ~12,000 draws at p = 0.25 / 0.75 (b, 6x smaller, is re-read ~18 times; the epoch ends when a is done).
    assert shares["a"] == pytest.approx(0.25, abs=0.02) and shares["b"] == pytest.approx(0.75, abs=0.02)
    assert sum(r["task_name"][0] == "a" for b_ in batches for r in b_) >= 3000 - 2 * 3  # a read once, to its end
    assert _queries(batches) == _queries(SameTaskBatches(specs, 4, seed=7, shuffle_buffer=16))
    assert _queries(batches) != _queries(SameTaskBatches(specs, 4, seed=8, shuffle_buffer=16))
    epoch1 = SameTaskBatches(specs, 4, seed=7, shuffle_buffer=16)
    epoch1.set_epoch(1)
    assert _queries(batches) != _queries(epoch1)


def test_temperature_sampling(tmp_path):
    a, b = _mixture_files(tmp_path)
    specs = [source_spec(a), source_spec(b)]
    assert mixture_probabilities(specs, temperature=1.0) == pytest.approx([3000 / 3500, 500 / 3500])
    p2 = mixture_probabilities(specs, temperature=2.0)
    assert p2 == pytest.approx([3000**0.5 / (3000**0.5 + 500**0.5), 500**0.5 / (3000**0.5 + 500**0.5)])
    assert mixture_probabilities(specs, temperature=1e6) == pytest.approx([0.5, 0.5], abs=1e-4)
    assert mixture_probabilities(specs) is None  # no weights, no temperature: one source after the other
    shares = _source_shares(SameTaskBatches(specs, 4, seed=1, temperature=2.0))
    assert shares["a"] == pytest.approx(p2[0], abs=0.02)
    # Caps count: a capped at 500 rows weighs like b.
    capped = [SourceSpec(a, max_rows=500), SourceSpec(b)]
    assert mixture_probabilities(capped, temperature=3.0) == pytest.approx([0.5, 0.5])


def test_max_rows_caps_a_source_to_its_first_rows(tmp_path):
    a, b = _mixture_files(tmp_path)
    allowed = {r["query"] for r in _rows(2, 1500, prefix="a-")[:40]}
    # Concatenated: exactly the first 40 rows of a, then all of b.
    ds = SameTaskBatches([SourceSpec(a, max_rows=40), SourceSpec(b)], 4, seed=0, leftovers="emit")
    seen = [r["query"] for bt in ds for r in bt]
    assert {q for q in seen if q.startswith("a-")} == allowed and len(seen) == 40 + 500
    # In a weighted mixture the cap holds on every pass over the source.
    mixed = SameTaskBatches([SourceSpec(a, weight=1, max_rows=40), SourceSpec(b, weight=1)], 4, seed=0)
    seen = [r["query"] for bt in mixed for r in bt]
    assert {q for q in seen if q.startswith("a-")} <= allowed and sum(q.startswith("a-") for q in seen) > 40


def test_source_entries_from_config(tmp_path):
    spec = source_spec({"path": str(tmp_path / "x.parquet"), "weight": 2, "max_rows": 10})
    assert spec == SourceSpec(tmp_path / "x.parquet", weight=2, max_rows=10)
    hub = source_spec({"hub": "org/data", "revision": "abc", "weight": 1, "rows": 100})
    assert hub.source.path == "org/data" and hub.source.revision == "abc" and hub.rows == 100
    with pytest.raises(ValueError, match="exactly one of `path`"):
        source_spec({"path": "a", "hub": "b"})
    with pytest.raises(ValueError, match="unknown keys: \\['wieght'\\]"):
        source_spec({"path": "a", "wieght": 1})
    with pytest.raises(ValueError, match="every source has a weight or none"):
        mixture_probabilities([SourceSpec(Path("a"), weight=1), SourceSpec(Path("b"))])
    with pytest.raises(DataError, match="give `rows: N`"):
        mixture_probabilities([source_spec({"hub": "org/data"})], temperature=2.0)


# -- DDP: every rank on the same task, the global batch split without duplication ---------------------
def _rank_batches(path, rank, world, num_workers=0, **kw):
    ds = SameTaskBatches([path], 4, seed=3, shuffle_buffer=5, rank=rank, world_size=world, **kw)
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=lambda b: (b.epoch, b.index, [r["query"] for r in b], b[0]["task_name"]),
    )
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_train_on_the_same_task_in_every_step_and_split_the_global_batch(tmp_path, num_workers):
    path = write_jsonl(tmp_path / "s.jsonl", _rows(5, 37))
    ranks = [_rank_batches(path, r, 2, num_workers) for r in (0, 1)]
    global_batches = list(SameTaskBatches([path], 4, seed=3, shuffle_buffer=5).global_batches(0, world_size=2))
    assert len(ranks[0]) == len(ranks[1]) == len(global_batches) == 5 * (37 // 8)
    for step, ((e0, i0, q0, t0), (e1, i1, q1, t1), g) in enumerate(zip(*ranks, global_batches)):
        assert (e0, i0) == (e1, i1) == (0, step)  # in stream order, also with workers
        assert t0 == t1 == g[0]["task_name"]
        assert len(q0) == len(q1) == 4 and not set(q0) & set(q1)
        assert q0 + q1 == [r["query"] for r in g]  # rank r holds rows [4r, 4r + 4) of the global batch


def test_world_size_one_with_workers_keeps_the_sequence(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", _rows(4, 40))
    assert _rank_batches(path, 0, 1, num_workers=0) == _rank_batches(path, 0, 1, num_workers=3)


def _index_task_queries(batch) -> list:
    return [batch.index, batch[0]["task_name"], [r["query"] for r in batch]]


def _ddp_worker(rank: int, world: int, init_file: str, path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = SameTaskBatches([Path(path)], 4, seed=3, shuffle_buffer=5)  # rank and world from torch.distributed
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_index_task_queries)
        Path(out).write_text(json.dumps(list(loader)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~40 s: two spawned ranks, each with two spawned DataLoader workers
def test_two_gloo_processes_see_the_same_task_sequence(tmp_path):
    import torch.multiprocessing as mp

    path = write_jsonl(tmp_path / "s.jsonl", _rows(5, 37))
    outs = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), str(path), str(outs[r]))) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    r0, r1 = (json.loads(o.read_text()) for o in outs)
    expected = list(SameTaskBatches([path], 4, seed=3, shuffle_buffer=5).global_batches(0, world_size=2))
    assert [b[0] for b in r0] == [b[0] for b in r1] == list(range(len(expected)))
    assert [b[1] for b in r0] == [b[1] for b in r1] == [g[0]["task_name"] for g in expected]
    assert [a[2] + b[2] for a, b in zip(r0, r1)] == [[r["query"] for r in g] for g in expected]


# -- position: exact resume of the stream -------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("consumed", [0, 3, 6])
def test_stream_resumes_at_the_saved_position(tmp_path, num_workers, consumed):
    path = write_jsonl(tmp_path / "s.jsonl", _rows(4, 30))
    make = lambda: SameTaskBatches([path], 4, seed=5, shuffle_buffer=4, rank=1, world_size=2)  # noqa: E731
    collate = lambda b: (b.epoch, b.index, tuple(r["query"] for r in b))  # noqa: E731
    first = make()
    first.set_epoch(1)
    full = list(DataLoader(first, batch_size=None, collate_fn=collate))
    for epoch, index, _ in full[:consumed]:
        first.mark_consumed(epoch, index)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert (state["epoch"], state["next_batch"]) == (1, consumed)
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(DataLoader(resumed, batch_size=None, num_workers=num_workers, collate_fn=collate))
    assert rest == full[consumed:]


def test_resume_with_other_data_settings_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", _rows(4, 30))
    state = SameTaskBatches([path], 4, seed=5, rank=0, world_size=2).state_dict()
    with pytest.raises(DataError, match=r"world_size: checkpoint 2, now 4"):
        SameTaskBatches([path], 4, seed=5, rank=0, world_size=4).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        SameTaskBatches([path], 4, seed=6, rank=0, world_size=2).load_state_dict(state)


def test_hydra_sources_build_the_weighted_mixture(tmp_path):
    """`data.sources=[{path: ..., weight: ..., max_rows: ...}]` from the command line, with
    data.train_files counting as weight 1."""
    from hydra.utils import instantiate

    from tests.helpers import load

    a, b = _mixture_files(tmp_path)
    extra = write_jsonl(tmp_path / "c.jsonl", _rows(1, 40, prefix="c-"))
    cfg = load(
        [
            "data=files",
            f"data.train_files=[{extra}]",
            f"data.sources=[{{path: {a}, weight: 2, max_rows: 100}}, {{path: {b}, weight: 1}}]",
        ]
    )
    dm = instantiate(cfg.data)
    specs = dm.sources()
    assert specs == [SourceSpec(extra, weight=1.0), SourceSpec(a, weight=2, max_rows=100), SourceSpec(b, weight=1)]
    assert SameTaskBatches(specs, 4).probabilities == pytest.approx([0.25, 0.5, 0.25])
    assert (
        instantiate(
            load(["data=files", "data.sources=[]", f"data.train_files=[{a}]", "data.temperature=2"]).data
        ).temperature
        == 2
    )

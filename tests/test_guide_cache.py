"""Guide-embedding cache: storage, identity, sharing across processes, and equality with the live guide."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from gist.data import parse_row, text_id
from gist.encoder import Encoder, FrozenGuide
from gist.guide_cache import GuideCache
from gist.losses import gist_loss

IDENTITY = dict(name="org/guide", revision=None, pooling="mean", max_length=64)


def _emb(n, d=8, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_roundtrip_partial_hits_and_float16_tolerance(tmp_path):
    cache = GuideCache(tmp_path, IDENTITY, dim=8)
    emb = _emb(5)
    cache.add([11, 12, 13, 14, 15], emb)
    assert cache.lookup([11]) is None  # buffered rows are not visible before a flush
    cache.flush()
    got = cache.lookup([15, 11, 13])
    torch.testing.assert_close(got, emb[[4, 0, 2]], atol=1e-3, rtol=0)  # float16 storage
    assert cache.lookup([11, 99]) is None and list(cache.missing([11, 99])) == [1]
    assert len(cache) == 5


def test_segments_accumulate_and_duplicates_are_not_rewritten(tmp_path):
    cache = GuideCache(tmp_path, IDENTITY, dim=8, flush_every=3)
    cache.add([1, 2], _emb(2, seed=1))
    cache.add([2, 3], _emb(2, seed=2))  # 4 rows buffered >= 3: flush, 3 distinct ids
    cache.add([3, 4], _emb(2, seed=3))
    cache.flush()  # only id 4 is new
    assert len(cache) == 4
    assert len(list(cache.dir.glob("*.keys.npy"))) == 2


def test_identity_change_is_a_different_cache(tmp_path):
    a = GuideCache(tmp_path, IDENTITY, dim=8)
    a.add([1], _emb(1))
    a.flush()
    for change in (dict(max_length=128), dict(pooling="cls"), dict(name="org/other"), dict(revision="abc")):
        other = GuideCache(tmp_path, {**IDENTITY, **change}, dim=8)
        assert other.dir != a.dir and other.lookup([1]) is None
    assert GuideCache(tmp_path, IDENTITY, dim=8, dtype="float32").dir != a.dir
    assert GuideCache(tmp_path, IDENTITY, dim=8).lookup([1]) is not None


def test_another_process_sees_new_segments_after_refresh(tmp_path):
    writer = GuideCache(tmp_path, IDENTITY, dim=8)
    reader = pickle.loads(pickle.dumps(writer))  # what a DataLoader worker / spawned rank gets
    assert reader.lookup([7]) is None
    writer.add([7], _emb(1))
    writer.flush()
    assert reader.lookup([7]) is None  # stale view...
    reader.refresh()
    assert reader.lookup([7]) is not None  # ...until it refreshes


def test_an_interrupted_write_leaves_no_visible_segment(tmp_path):
    cache = GuideCache(tmp_path, IDENTITY, dim=8)
    cache.dir.mkdir(parents=True)
    np.save(cache.dir / "seg-x.emb.npy", np.zeros((1, 8), np.float16))  # emb written, keys never renamed
    assert len(GuideCache(tmp_path, IDENTITY, dim=8)) == 0


def test_loss_and_masks_with_cached_guide_match_the_live_guide(tmp_path, tiny_guide, gist_rows):
    guide = FrozenGuide(Encoder(str(tiny_guide)))
    rows = [parse_row(r, "x") for r in gist_rows if r["task_name"] == "task-a"][:12]
    blocks = {"anchor": [r["query"] for r in rows], "positive": [r["pos"] for r in rows], "negative": [r["neg"] for r in rows]}
    live = {k: guide(guide.tokenize(v)) for k, v in blocks.items()}
    cache = GuideCache.for_encoder(tmp_path, guide)
    assert cache.fill(guide, [t for v in blocks.values() for t in v]) > 0
    cached = {k: cache.lookup([text_id(t) for t in v]) for k, v in blocks.items()}
    student = {k: _emb(12, d=16, seed=i) for i, k in enumerate(blocks)}

    def run(g):
        return gist_loss(student["anchor"], student["positive"], student["negative"], guide_anchor=g["anchor"],
                         guide_positive=g["positive"], guide_negative=g["negative"])

    (l_live, s_live), (l_cached, s_cached) = run(live), run(cached)
    # Stated storage tolerance: float16 moves guide cosines by < 2e-3. Masks agree unless a candidate's guide
    # similarity lies within that band of its threshold; on this batch none does, so the losses agree closely.
    for k in blocks:
        assert (live[k] - cached[k]).abs().max() < 2e-3
    assert s_live["masked_frac"] == s_cached["masked_frac"]
    torch.testing.assert_close(l_live, l_cached, rtol=1e-4, atol=1e-4)
    assert cache.fill(guide, blocks["anchor"]) == 0  # all cached now


def test_training_with_a_prefilled_cache_runs_no_guide_forward(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch):
    from tests.test_train import tiny_cfg, train_script

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr"])
    calls = []
    real = FrozenGuide.forward
    monkeypatch.setattr(FrozenGuide, "forward", lambda self, f: calls.append(1) or real(self, f))
    train_script.train(cfg)  # prefill happens in prepare_data (guide calls through Encoder.encode, not FrozenGuide)
    assert calls == []
    cache_dirs = list((tmp_path / "cache" / "guide").iterdir())
    assert len(cache_dirs) == 1 and len(list(cache_dirs[0].glob("*.keys.npy"))) >= 1


def test_fill_on_first_sight_writes_what_the_live_guide_computed(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    from tests.test_train import tiny_cfg, train_script

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr", "guide_cache.prefill=false"])
    train_script.train(cfg)
    (cache_dir,) = list((tmp_path / "cache" / "guide").iterdir())
    n = sum(len(np.load(p)) for p in cache_dir.glob("*.keys.npy"))
    assert n in (16, 24)  # one batch of 8 rows: 8 anchors + 8 positives (+ 8 negatives for a triplet task)


def test_mining_fills_the_guide_cache(tmp_path, mteb_dir, tiny_guide):
    from gist.mining import MinedTriplets, read_classification

    miner = MinedTriplets(str(mteb_dir / "TinyTopicClassification"), guide=str(tiny_guide), guide_cache_dir=str(tmp_path / "g"))
    miner.materialize(tmp_path / "c")
    cache = GuideCache.for_encoder(tmp_path / "g", Encoder(str(tiny_guide)))
    texts, _ = read_classification(mteb_dir / "TinyTopicClassification")
    assert cache.lookup([text_id(t) for t in texts]) is not None


def test_cache_guide_script_fills_what_training_looks_up(tmp_path, tiny_student, tiny_guide, gist_file, gist_rows, mteb_dir):
    import importlib.util
    from pathlib import Path

    from tests.test_train import tiny_cfg

    spec = importlib.util.spec_from_file_location("cache_guide", Path(__file__).resolve().parents[1] / "scripts" / "cache_guide.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir)
    cache = script.fill_cache(cfg, chunk=50)
    texts = {t for r in gist_rows for t in (r["query"], r["pos"], r["neg"]) if t}
    assert len(cache) == len(texts)
    assert cache.lookup([text_id(t) for t in texts]) is not None
    again = script.fill_cache(cfg)
    assert len(again) == len(texts)  # nothing recomputed or duplicated


def _segments(cache_root):
    return sorted(p.name for p in cache_root.rglob("*.keys.npy"))


@pytest.mark.parametrize("prefill", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_guide_cache_under_two_process_ddp(tmp_path, tiny_student, tiny_guide, gist_file, gist_rows, mteb_dir, prefill):
    """trainer=ddp_sim (2 processes, gloo). Prefilled: the ranks add nothing, i.e. run no guide forward
    (a live forward is written back as a new segment at train end). Filled on first sight: both ranks
    write their own segments into the shared folder and every text they saw is readable afterwards."""
    from tests.test_train import tiny_cfg, train_script

    overrides = ["trainer=ddp_sim", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 f"guide_cache.prefill={str(prefill).lower()}", "export=false", "compare_tasks_dir=null"]
    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, overrides)
    root = tmp_path / "cache" / "guide"
    score = train_script.train(cfg)  # prefill runs in prepare_data, in the launching process
    assert isinstance(score, float)  # the best val score travels back from the spawned ranks
    assert len(list(root.iterdir())) == 1
    segments = _segments(root)
    pids = {name.split("-")[1] for name in segments}
    cache = GuideCache.for_encoder(tmp_path / "cache" / "guide", Encoder(str(tiny_guide), max_length=48))
    if prefill:
        texts = {t for r in gist_rows for t in (r["query"], r["pos"], r["neg"]) if t}
        assert len(cache) == len(texts) and len(pids) == 1  # one writer: the prefill in the launching process
    else:
        assert len(pids) == 2  # each rank wrote what its live guide computed
        assert len(cache) >= 2 * 16  # two steps x two ranks x (8 anchors + 8 positives) at least, deduplicated

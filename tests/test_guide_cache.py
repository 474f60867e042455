"""Guide-embedding cache: storage, identity, sharing across processes, and equality with the live guide."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from gist.core.encoder import Encoder, FrozenGuide
from gist.core.guide_cache import GuideCache
from gist.core.losses import gist_loss
from gist.data.records import parse_row, text_id

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
    from gist.core.losses import guide_mask

    # Mean pooling: the tiny guide's CLS vectors are all nearly parallel (cosines ~0.9999), which would make
    # almost every veto a rounding-level decision; mean-pooled cosines spread over ~0.87-1.
    guide = FrozenGuide(Encoder(str(tiny_guide), pooling="mean"))
    rows = [parse_row(r, "x") for r in gist_rows if r["task_name"] == "task-a"][:12]
    blocks = {
        "anchor": [r["query"] for r in rows],
        "positive": [r["pos"] for r in rows],
        "negative": [r["neg"] for r in rows],
    }
    live = {k: guide(guide.tokenize(v)) for k, v in blocks.items()}
    cache = GuideCache.for_encoder(tmp_path, guide)
    assert cache.fill(guide, [t for v in blocks.values() for t in v]) > 0
    cached = {k: cache.lookup([text_id(t) for t in v]) for k, v in blocks.items()}
    student = {k: _emb(12, d=16, seed=i) for i, k in enumerate(blocks)}

    def run(g):
        return gist_loss(
            student["anchor"],
            student["positive"],
            student["negative"],
            guide_anchor=g["anchor"],
            guide_positive=g["positive"],
            guide_negative=g["negative"],
        )

    (l_live, s_live), (l_cached, s_cached) = run(live), run(cached)
    B, d = live["anchor"].shape

    # Storage tolerance, per element: float16 rounds x to within 2^-11 |x| (<= 2^-12 on unit vectors); the fill
    # path (length-sorted batches, other padding) differs from the live forward only in fp32 summation order,
    # < 1e-5 absolute on any CPU kernel (measured ~1e-7). It catches wrong rows: here they differ by >= 2e-3.
    def stored_as(ref, got):
        return bool(((got - ref).abs() <= 2**-11 * ref.abs() + 1e-5).all())

    for k in blocks:
        assert stored_as(live[k], cached[k]), k
        assert not stored_as(live[k], cached[k].roll(1, 0)), k  # the check would see rows off by one

    # Guide cosines. Each unit vector moves by <= eta (the bound above, as a vector norm), so a cosine of angle
    # theta moves by <= 2 eta sin(theta) + 2 eta^2 (exact for unit vectors), plus fp32 rounding of the two
    # cosines (< 7e-6 at d = 48 with any summation order).
    eta = 1.01 * (2**-11 + 1e-5 * d**0.5)
    v_live, v_cached = (
        guide_mask(live["anchor"], live["positive"], live["negative"]),
        guide_mask(cached["anchor"], cached["positive"], cached["negative"]),
    )
    sin = ((1 - v_live.sim**2).clamp_min(0) + 1e-5).sqrt()  # + 1e-5: sim itself is rounded near 1
    tol = 2 * eta * sin + 2 * eta**2 + 7e-6  # (B, C)
    rows_ = torch.arange(B)
    cutoff_tol = tol[rows_, rows_].unsqueeze(1)  # the cut-off is t_i - margin, t_i = the ap cosine at (i, i)
    assert ((v_live.sim - v_cached.sim).abs() <= tol).all()
    assert ((v_live.cutoff - v_cached.cutoff).abs() <= cutoff_tol).all()

    # Masks may differ only where the live score lies within both movements of its live cut-off.
    borderline = (v_live.sim - v_live.cutoff).abs() <= tol + cutoff_tol
    assert not (v_live.mask != v_cached.mask)[~borderline].any()
    n_cand = v_live.mask.numel()
    assert abs(s_live["masked_frac"].item() - s_cached["masked_frac"].item()) <= borderline.sum().item() / n_cand + 1e-7
    assert borderline.float().mean() < 0.1  # the mask check above constrains most candidates

    # Each loss is the InfoNCE of the student's fp32 logits under its own guide's mask (independent reference:
    # [ap | an | aa | pp] / 0.01, target i, vetoed logits -inf). Logits are 100 x cosines with fp32 error
    # < 1e-6 (d = 16), so the losses agree within 1e-4 + 1e-5 relative on any CPU.
    a, p, n = student["anchor"], student["positive"], student["negative"]
    logits = torch.cat([a @ p.T, a @ n.T, a @ a.T, p @ p.T], dim=1) / 0.01

    def reference(mask):
        mask = mask.clone()
        mask[rows_, rows_] = False  # the target is never masked
        return torch.nn.functional.cross_entropy(logits.masked_fill(mask, float("-inf")), rows_)

    assert 0 < s_live["masked_frac"] < 1 and l_live > 0.01  # masks and loss are not vacuous
    torch.testing.assert_close(l_live, reference(v_live.mask), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(l_cached, reference(v_cached.mask), rtol=1e-5, atol=1e-4)
    if torch.equal(v_live.mask, v_cached.mask):
        torch.testing.assert_close(l_live, l_cached, rtol=1e-5, atol=1e-4)
    assert cache.fill(guide, blocks["anchor"]) == 0  # all cached now


def test_training_with_a_prefilled_cache_runs_no_guide_forward(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch
):
    from gist.train import train
    from tests.helpers import assert_metric, tiny_cfg

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr"])
    calls = []
    real = FrozenGuide.forward
    monkeypatch.setattr(FrozenGuide, "forward", lambda self, f: calls.append(1) or real(self, f))
    assert_metric(train(cfg))  # prefill happens in prepare_data (guide calls through Encoder.encode, not FrozenGuide)
    assert calls == []
    cache_dirs = list((tmp_path / "cache" / "guide").iterdir())
    assert len(cache_dirs) == 1 and len(list(cache_dirs[0].glob("*.keys.npy"))) >= 1


def test_fill_on_first_sight_writes_what_the_live_guide_computed(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir
):
    from gist.train import train
    from tests.helpers import assert_metric, tiny_cfg

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr", "guide_cache.prefill=false"])
    assert_metric(train(cfg))
    (cache_dir,) = list((tmp_path / "cache" / "guide").iterdir())
    n = sum(len(np.load(p)) for p in cache_dir.glob("*.keys.npy"))
    assert n in (16, 24)  # one batch of 8 rows: 8 anchors + 8 positives (+ 8 negatives for a triplet task)


def test_mining_fills_the_guide_cache(tmp_path, mteb_dir, tiny_guide):
    from gist.data.mining import MinedTriplets, read_classification

    miner = MinedTriplets(
        str(mteb_dir / "TinyTopicClassification"), guide=str(tiny_guide), guide_cache_dir=str(tmp_path / "g")
    )
    miner.materialize(tmp_path / "c")
    cache = GuideCache.for_encoder(tmp_path / "g", Encoder(str(tiny_guide)))
    texts, _ = read_classification(mteb_dir / "TinyTopicClassification")
    assert cache.lookup([text_id(t) for t in texts]) is not None


def test_cache_guide_script_fills_what_training_looks_up(
    tmp_path, tiny_student, tiny_guide, gist_file, gist_rows, mteb_dir
):
    from hydra.utils import instantiate

    from gist.core.guide_cache import fill_from_datamodule
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir)  # as scripts/cache_guide.py composes it
    guide = instantiate(cfg.guide)
    cache, computed = fill_from_datamodule(
        instantiate(cfg.data), guide, cfg.guide_cache.dir, dtype=cfg.guide_cache.dtype, chunk=50
    )
    texts = {t for r in gist_rows for t in (r["query"], r["pos"], r["neg"]) if t}
    assert len(cache) == computed == len(texts)
    assert cache.lookup([text_id(t) for t in texts]) is not None
    again, computed = fill_from_datamodule(
        instantiate(cfg.data), guide, cfg.guide_cache.dir, dtype=cfg.guide_cache.dtype
    )
    assert len(again) == len(texts) and computed == 0  # nothing recomputed or duplicated
    assert again.dir == GuideCache.for_encoder(cfg.guide_cache.dir, guide, dtype=cfg.guide_cache.dtype).dir


def _segments(cache_root):
    return sorted(p.name for p in cache_root.rglob("*.keys.npy"))


# Slow (a 2-process ddp_sim run, ~15 s): the default tier has the cache's prefill and fill-on-first-sight in
# training (above), its sharing across processes (test_another_process_sees_new_segments_after_refresh) and
# 2-process DDP (test_recipes.py::test_ddp_recipe_on_two_cpu_processes).
@pytest.mark.slow
@pytest.mark.parametrize("prefill", [True, False])
def test_guide_cache_under_two_process_ddp(tmp_path, tiny_student, tiny_guide, gist_file, gist_rows, mteb_dir, prefill):
    """trainer=ddp_sim (2 processes, gloo). Prefilled: the ranks add nothing, i.e. run no guide forward
    (a live forward is written back as a new segment at train end). Filled on first sight: both ranks
    write their own segments into the shared folder and every text they saw is readable afterwards."""
    from gist.train import train
    from tests.helpers import assert_metric, tiny_cfg

    overrides = [
        "trainer=ddp_sim",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        f"guide_cache.prefill={str(prefill).lower()}",
        "export=false",
        "compare_tasks_dir=null",
    ]
    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, overrides)
    root = tmp_path / "cache" / "guide"
    score = train(cfg)  # prefill runs in prepare_data, in the launching process
    assert_metric(score)  # the best val score travels back from the spawned ranks
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

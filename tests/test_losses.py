"""Loss correctness: golden agreement with sentence-transformers, hand-computed cases, invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gist.core.loss_modules import GISTLoss, MNRLLoss, NoGuideLoss
from gist.core.losses import gist_loss, mnrl_loss, no_guide_loss

pytestmark = pytest.mark.unit

st_gist = pytest.importorskip("sentence_transformers.sentence_transformer.losses.gist_embed")


def _st_gist_loss(monkeypatch, student, guide, **kwargs):
    """sentence-transformers' GISTEmbedLoss.forward on given embeddings (its encoders stubbed out)."""
    loss = st_gist.GISTEmbedLoss.__new__(st_gist.GISTEmbedLoss)
    nn.Module.__init__(loss)
    student_model, guide_model = object(), object()
    loss.model, loss.guide = student_model, guide_model
    loss.temperature = kwargs.pop("temperature", 0.01)
    loss.similarity_fct = nn.CosineSimilarity(dim=-1)
    loss.must_retokenize = False
    loss.margin_strategy = kwargs.pop("margin_strategy", "absolute")
    loss.margin = kwargs.pop("margin", 0.0)
    loss.contrast_anchors = kwargs.pop("contrast_anchors", True)
    loss.contrast_positives = kwargs.pop("contrast_positives", True)
    loss.gather_across_devices = False
    loss.cross_entropy_loss = nn.CrossEntropyLoss()
    assert not kwargs
    outputs = {id(student_model): student, id(guide_model): guide}
    monkeypatch.setattr(st_gist, "embed_columns", lambda model, features: list(outputs[id(model)]))
    return loss.forward([{} for _ in student], labels=None)


def _random_batch(B=8, d=16, dg=12, negatives=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(B, d, generator=g) for _ in range(3 if negatives else 2)]
    # A guide correlated with the student so that some, not all, candidates get masked.
    proj = torch.randn(d, dg, generator=g)
    guide = [s @ proj + 0.8 * torch.randn(B, dg, generator=g) for s in student]
    return student, guide


def _ours(student, guide, **kwargs):
    neg = student[2] if len(student) == 3 else None
    gneg = guide[2] if len(guide) == 3 else None
    return gist_loss(
        student[0], student[1], neg, guide_anchor=guide[0], guide_positive=guide[1], guide_negative=gneg, **kwargs
    )


def _veto_gap(guide, margin_strategy="absolute", margin=0.0, contrast_anchors=True, contrast_positives=True) -> float:
    """Smallest |guide score - cut-off| over the non-target candidates. Two fp32 computations of these
    cosines (other kernels, shapes, row orders or libraries) differ by < 1e-6 on any CPU, so a gap above 1e-5
    means every path vetoes exactly the same candidates."""
    from gist.core.losses import guide_mask

    veto = guide_mask(
        guide[0],
        guide[1],
        guide[2] if len(guide) == 3 else None,
        margin_strategy=margin_strategy,
        margin=margin,
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
    )
    gap = (veto.sim - veto.cutoff).abs()
    rows = torch.arange(gap.size(0))
    gap[rows, rows] = float("inf")  # the targets, never masked
    return gap.min().item()


@pytest.mark.parametrize(
    "margin_strategy,margin,negatives,contrast_anchors,contrast_positives",
    [
        (s, m, n, ca, cp)
        for s, m in [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.0), ("relative", 0.2)]
        for n in (True, False)
        for ca, cp in [(True, True), (False, True), (True, False), (False, False)]
    ],
)
def test_matches_sentence_transformers(
    monkeypatch, margin_strategy, margin, negatives, contrast_anchors, contrast_positives
):
    for seed in range(3):
        student, guide = _random_batch(negatives=negatives, seed=seed)
        kwargs = dict(
            margin_strategy=margin_strategy,
            margin=margin,
            contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives,
        )
        ours, stats = _ours(student, guide, **kwargs)
        theirs = _st_gist_loss(monkeypatch, student, guide, **kwargs)
        assert 0 < stats["masked_frac"] < 1  # the case actually exercises masking
        assert _veto_gap(guide, **kwargs) > 1e-5  # both implementations veto the same candidates (>= 1.3e-4 here)
        # Cosines of the same vectors by two fp32 reductions (ST: CosineSimilarity; ours: normalize + matmul)
        # agree to < 5e-7 at d = 16; logits are 100 x that and the loss moves by at most twice the largest
        # logit change: atol 1e-4 on any CPU (measured <= 3e-6 under default / avx2 / avx512).
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_matches_sentence_transformers_gradients(monkeypatch):
    student, guide = _random_batch(seed=4)
    ours_in = [s.clone().requires_grad_() for s in student]
    theirs_in = [s.clone().requires_grad_() for s in student]
    _ours(ours_in, guide)[0].backward()
    _st_gist_loss(monkeypatch, theirs_in, guide).backward()
    assert _veto_gap(guide) > 1e-5  # same vetoes on both sides (5e-5 here)
    # fp32 noise of logits at 1/T = 100 is relative to the largest gradient: atol 1e-4 x it (measured 1.4e-7 x).
    scale = max(b.grad.abs().max().item() for b in theirs_in)
    for a, b in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * scale)


def test_hand_computed_3x3():
    """3 pairs, 2-d unit vectors, guide = student. Row 0's guide threshold is cos(a0,p0)=0.8; p1 scores
    0.96 > 0.8 with a0 so it is masked; everything else is computed by hand below."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6], [0.6, 0.8], [-0.6, -0.8]])
    loss, stats = gist_loss(a, p, guide_anchor=a, guide_positive=p, temperature=1.0)
    # Row 0: t=0.8. ap: [0.8 target, 0.6, -0.6]; aa: [1 (masked: 1>0.8), 0, -1]; pp: [1 masked, 0.96 masked, -0.96]
    row0 = -0.8 + math.log(
        math.exp(0.8) + math.exp(0.6) + math.exp(-0.6) + math.exp(0) + math.exp(-1) + math.exp(-0.96)
    )
    # Row 1: t=0.8. ap: [0.6, 0.8 target, -0.8]; aa: [0, 1 masked, 0]; pp: [0.96 masked, 1 masked, p1.p2=-1]
    row1 = -0.8 + math.log(math.exp(0.6) + math.exp(0.8) + math.exp(-0.8) + 2 * math.exp(0) + math.exp(-1))
    # Row 2: t=0.6. ap: [-0.8, -0.6, 0.6 target]; aa: [-1, 0, 1 masked]; pp: [p2.p0=-0.96, p2.p1=-1, 1 masked]
    row2 = -0.6 + math.log(
        math.exp(-0.8) + math.exp(-0.6) + math.exp(0.6) + math.exp(-1) + math.exp(0) + math.exp(-0.96) + math.exp(-1)
    )
    assert loss.item() == pytest.approx((row0 + row1 + row2) / 3, abs=1e-6)
    # 9 columns x 3 rows; masked: row0 {aa0, pp0, pp1}, row1 {aa1, pp0, pp1}, row2 {aa2, pp2} = 8
    assert stats["masked_frac"].item() == pytest.approx(8 / 27)
    assert stats["effective_negatives"].item() == pytest.approx((5 + 5 + 6) / 3)


def _plain_four_block(a, p, n, temperature):
    a, p, n = (F.normalize(x, dim=-1) for x in (a, p, n))
    logits = torch.cat([a @ p.T, a @ n.T, a @ a.T, p @ p.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(a.size(0)))


def test_nothing_masked_equals_plain_four_block_infonce():
    student, _ = _random_batch(seed=1)
    B = student[0].size(0)
    # Guide: every anchor-positive pair scores 1 (the max), every other pair 0, self-pairs exactly 1 too:
    # strict '>' leaves everything unmasked.
    e = torch.eye(B)
    loss, stats = gist_loss(
        *student, guide_anchor=e, guide_positive=e, guide_negative=torch.zeros(B, B), temperature=0.05
    )
    assert stats["masked_frac"].item() == 0.0
    torch.testing.assert_close(loss, _plain_four_block(*student, 0.05), rtol=1e-5, atol=1e-6)


def test_masked_logits_are_minus_inf_and_target_is_finite(monkeypatch):
    student, guide = _random_batch(seed=2)
    captured = {}
    real_ce = F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        captured["logits"], captured["target"] = logits.detach(), target
        return real_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    # The guide puts every candidate of row 0 exactly on its anchor (cos 1) and its positive a bit off
    # (cos < 1): row 0 must mask all but its target.
    guide = [g.clone() for g in guide]
    u = guide[0][0].clone()
    guide[1][:] = u
    guide[2][:] = u
    guide[1][0] = u + 0.5 * torch.randn_like(u)
    loss, _ = _ours(student, guide)
    logits, target = captured["logits"], captured["target"]
    assert torch.isfinite(loss)
    assert torch.isfinite(logits[torch.arange(len(target)), target]).all()
    row0 = logits[0].clone()
    row0[target[0]] = float("-inf")
    assert torch.isneginf(row0[: student[1].size(0) + student[2].size(0)]).all()


def test_permutation_invariance():
    student, guide = _random_batch(seed=3)
    perm = torch.randperm(student[0].size(0), generator=torch.Generator().manual_seed(0))
    base, _ = _ours(student, guide)
    permuted, _ = _ours([s[perm] for s in student], [g[perm] for g in guide])
    # Reordered rows: fp32 summation order only. Same vetoes (gap >> 1e-6 noise); logits 100 x cosines with
    # error < 1e-6: the loss moves by < 1e-4 on any CPU.
    assert _veto_gap(guide) > 1e-5
    torch.testing.assert_close(base, permuted, rtol=1e-5, atol=1e-4)


def test_relative_margin_filters_with_negative_threshold():
    """t_i < 0: the relative rule t - |t|*m lowers the threshold (it must not raise it, as t*(1-m) would)."""
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[-0.6, 0.8]])  # t = -0.6
    n = torch.tensor([[-0.65, 0.76]])  # G_an = -0.65: below t, but above t - |t|*0.2 = -0.72
    common = dict(guide_anchor=a, guide_positive=p, guide_negative=n, contrast_anchors=False, contrast_positives=False)
    _, kept = gist_loss(a, p, n, margin_strategy="relative", margin=0.0, **common)
    _, filtered = gist_loss(a, p, n, margin_strategy="relative", margin=0.2, **common)
    assert kept["masked_frac"].item() == 0.0
    assert filtered["masked_frac"].item() == pytest.approx(0.5)


def test_target_offset_with_margin_is_finite():
    """Rank > 0 of a gathered batch: anchors are rows [B, 2B) of the positives; with a margin the target
    column must still be protected (regression: a margin > 0 masks G_ii > t_i - m, i.e. the target)."""
    student, guide = _random_batch(B=4, seed=5)
    other_s, other_g = _random_batch(B=4, seed=6)
    pos = torch.cat([other_s[1], student[1]])
    gpos = torch.cat([other_g[1], guide[1]])
    loss, stats = gist_loss(student[0], pos, guide_anchor=guide[0], guide_positive=gpos, margin=0.1, target_offset=4)
    assert torch.isfinite(loss)
    assert stats["masked_frac"] > 0


def test_target_offset_equals_local_when_gathered_rows_are_copies():
    student, guide = _random_batch(B=4, negatives=False, seed=7)
    local, _ = _ours(student, guide)
    doubled = [student[0], torch.cat([student[1], student[1]])]
    gdoubled = [guide[0], torch.cat([guide[1], guide[1]])]
    # Duplicated positives are masked via the guide (G equal to the threshold is not > t, so use a margin).
    shifted, _ = _ours(doubled, gdoubled, target_offset=4, margin=1e-6)
    assert torch.isfinite(shifted)
    assert shifted.item() != pytest.approx(local.item())  # extra candidates do change the loss


def test_multiple_negatives_per_anchor_are_flattened():
    student, guide = _random_batch(B=4, seed=8)
    g = torch.Generator().manual_seed(9)
    n3, gn3 = torch.randn(4, 3, 16, generator=g), torch.randn(4, 3, 12, generator=g)
    loss3, stats3 = gist_loss(
        student[0], student[1], n3, guide_anchor=guide[0], guide_positive=guide[1], guide_negative=gn3
    )
    flat, stats_flat = gist_loss(
        student[0],
        student[1],
        n3.reshape(12, 16),
        guide_anchor=guide[0],
        guide_positive=guide[1],
        guide_negative=gn3.reshape(12, 12),
    )
    torch.testing.assert_close(loss3, flat)
    assert stats3["candidates"].item() == 4 + 12 + 4 + 4


def test_mask_self_pairs_masks_diagonals_even_when_guide_would_not():
    student, _ = _random_batch(B=4, seed=10)
    e = torch.eye(4)
    guide = dict(guide_anchor=e, guide_positive=e, guide_negative=torch.roll(e, 1, 1))
    _, off = gist_loss(*student, **guide)
    _, on = gist_loss(*student, **guide, mask_self_pairs=True)
    assert off["masked_frac"].item() == 0.0
    assert on["masked_frac"].item() == pytest.approx(8 / (4 * 16))


def test_duplicate_text_mask_hides_copies_of_the_positive():
    student, _ = _random_batch(B=4, negatives=False, seed=11)
    e = torch.eye(4)  # a guide that masks nothing
    ids_a, ids_p = torch.tensor([1, 2, 3, 4]), torch.tensor([10, 11, 10, 12])  # rows 0 and 2 share a positive text
    _, plain = gist_loss(*student, guide_anchor=e, guide_positive=e)
    loss, stats = gist_loss(*student, guide_anchor=e, guide_positive=e, text_ids=(ids_a, ids_p, None))
    assert plain["masked_frac"].item() == 0.0
    # Row 0 loses p2 in ap and pp, row 2 loses p0 in ap and pp, and every row its own positive in pp
    # (same text); the targets stay: 8 of 4 x 12 logits.
    assert stats["masked_frac"].item() == pytest.approx(8 / 48)
    a, p = (F.normalize(x, dim=-1) for x in student)
    logits = torch.cat([a @ p.T, a @ a.T, p @ p.T], dim=1)
    for row, col in [(0, 2), (2, 0), (0, 0), (1, 1), (2, 2), (3, 3)]:
        logits[row, 8 + col] = float("-inf")
        if row != col:
            logits[row, col] = float("-inf")
    torch.testing.assert_close(loss, F.cross_entropy(logits / 0.01, torch.arange(4)))


def test_no_guide_loss_is_four_block_with_self_pairs_masked():
    a, p, n = _random_batch(seed=12)[0]
    loss, stats = no_guide_loss(a, p, n, temperature=0.05)
    an, pn, nn_ = (F.normalize(x, dim=-1) for x in (a, p, n))
    B = a.size(0)
    aa = (an @ an.T).masked_fill(torch.eye(B, dtype=torch.bool), float("-inf"))
    pp = (pn @ pn.T).masked_fill(torch.eye(B, dtype=torch.bool), float("-inf"))
    logits = torch.cat([an @ pn.T, an @ nn_.T, aa, pp], dim=1) / 0.05
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(B)))
    assert stats["masked_frac"].item() == pytest.approx(2 * B / (B * 4 * B))


def test_mnrl_matches_sentence_transformers():
    from sentence_transformers.util import cos_sim

    a, p, n = _random_batch(seed=13)[0]
    loss, _ = mnrl_loss(a, p, n)
    scores = torch.cat([cos_sim(a, p), cos_sim(a, n)], dim=1) * 20.0  # ST's MNRL: scale 20, [ap | an]
    # ST's cos_sim and ours agree to < 5e-7 in fp32 on any CPU; logits are 20 x that: atol 2e-5.
    torch.testing.assert_close(loss, F.cross_entropy(scores, torch.arange(a.size(0))), rtol=1e-5, atol=2e-5)


def test_gist_with_guide_equal_to_nothing_masked_matches_no_guide():
    """When the guide masks exactly the self-pairs, GIST reduces to the no-guide 4-block loss."""
    student, _ = _random_batch(B=5, seed=14)
    e = torch.eye(5)
    zero_neg = torch.roll(e, 2, 1)
    gl, _ = gist_loss(*student, guide_anchor=e, guide_positive=e, guide_negative=zero_neg, mask_self_pairs=True)
    nl, _ = no_guide_loss(*student)
    torch.testing.assert_close(gl, nl)


def test_module_wrappers_validate_eagerly_and_dispatch():
    with pytest.raises(ValueError, match="temperature"):
        GISTLoss(temperature=0)
    with pytest.raises(ValueError, match="margin_strategy"):
        GISTLoss(margin_strategy="percent")
    student, guide = _random_batch(seed=15)
    s = dict(zip(["anchor", "positive", "negative"], student))
    g = dict(zip(["anchor", "positive", "negative"], guide))
    loss, _ = GISTLoss(margin=0.05)(s, g)
    torch.testing.assert_close(loss, _ours(student, guide, margin=0.05)[0])
    assert GISTLoss.requires_guide and not NoGuideLoss.requires_guide and not MNRLLoss.requires_guide
    torch.testing.assert_close(NoGuideLoss()(s)[0], no_guide_loss(*student)[0])
    torch.testing.assert_close(MNRLLoss()(s)[0], mnrl_loss(*student)[0])


def test_gradients_do_not_flow_into_guide_and_reach_all_student_inputs():
    student, guide = _random_batch(seed=16)
    student = [s.requires_grad_() for s in student]
    guide = [g.requires_grad_() for g in guide]
    _ours(student, guide)[0].backward()
    assert all(g.grad is None for g in guide)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_embeddings_give_fp32_loss(dtype):
    student, guide = _random_batch(seed=17)
    ref, _ = _ours(student, guide)
    low, _ = _ours([s.to(dtype) for s in student], [g.to(dtype) for g in guide])
    assert low.dtype == torch.float32
    # bf16 rounding of the inputs (rel. 2^-8) moves logits at 1/tau=100 by ~0.4; the loss stays close
    # (measured 0.03 for bf16, 0.005 for fp16, of 28). The cast is exactly rounded on every CPU and the rest
    # runs in fp32 (noise < 1e-4 on the loss), so only the bound's 100x headroom is at stake, not the CPU.
    assert abs(low.item() - ref.item()) < 0.1 * max(1.0, abs(ref.item()))


def test_all_flag_combinations_are_finite():
    student, guide = _random_batch(seed=18)
    for ca, cp, self_mask in itertools.product([True, False], repeat=3):
        loss, _ = _ours(student, guide, contrast_anchors=ca, contrast_positives=cp, mask_self_pairs=self_mask)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("loss_fn", ["gist", "mnrl", "no_guide"])
def test_loss_is_fp32_inside_a_bf16_autocast_region(loss_fn):
    """Under bf16-mixed the encoders run in bf16, but the similarities and the loss stay fp32."""
    student, guide = _random_batch(seed=19)
    student = [s.to(torch.bfloat16) for s in student]
    fns = {
        "gist": lambda: _ours(student, guide)[0],
        "mnrl": lambda: mnrl_loss(*student)[0],
        "no_guide": lambda: no_guide_loss(*student)[0],
    }
    ref = fns[loss_fn]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fns[loss_fn]()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)

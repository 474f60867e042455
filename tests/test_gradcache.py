"""GradCache equivalence: loss AND parameter gradients equal the plain step; dropout is replayed exactly."""

from __future__ import annotations

import pytest
import torch

from gist.core.encoder import Encoder
from gist.core.gradcache import _chunks, cached_loss
from gist.core.loss_modules import GISTLoss, MNRLLoss

pytestmark = pytest.mark.unit

# Lengths vary within each block, so mini-batches are trimmed to different widths.
TEXTS = {
    "anchor": [f"the cat {w} plays piano" + " very" * (i % 4) for i, w in enumerate("abcdefghij")],
    "positive": [f"a dog {w} eats food" + " and cake" * (i % 3) for i, w in enumerate("abcdefghij")],
    "negative": [f"my bank card {w} money" + " please" * (i % 5) for i, w in enumerate("abcdefghij")],
}


def _setup(tiny_student, tiny_guide):
    student = Encoder(str(tiny_student))
    guide = Encoder(str(tiny_guide)).eval()
    feats = {k: dict(student.tokenize(v)) for k, v in TEXTS.items()}
    with torch.no_grad():
        g = {k: guide(guide.tokenize(v)) for k, v in TEXTS.items()}
    return student, feats, g


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain(student, feats, loss_fn):
    student.zero_grad()
    loss, stats = loss_fn({k: student(f) for k, f in feats.items()})
    loss.backward()
    return loss.detach(), stats, _grads(student)


def _cached(student, feats, loss_fn, mini):
    student.zero_grad()
    loss, stats = cached_loss(student, feats, loss_fn, mini)
    loss.backward()
    return loss.detach(), stats, _grads(student)


@pytest.mark.parametrize("mini", [1, 3, 4, 10])
# margin 0: with the tiny random guide (pair cosines ~0.9999) a positive margin vetoes every candidate,
# the loss is 0 and the comparison vacuous; the non-zero checks below guard against that.
@pytest.mark.parametrize("loss_module", [GISTLoss(), MNRLLoss()])
def test_cached_equals_plain_loss_and_gradients(tiny_student, tiny_guide, mini, loss_module):
    student, feats, g = _setup(tiny_student, tiny_guide)
    student.eval()  # no dropout: the plain full-batch forward is the reference
    loss_fn = lambda emb: loss_module(emb, g)  # noqa: E731
    l_plain, s_plain, g_plain = _plain(student, feats, loss_fn)
    l_cached, s_cached, g_cached = _cached(student, feats, loss_fn, mini)
    # Mini-batches are trimmed to other widths, so student embeddings differ by fp32 summation order only
    # (cosine error < 1e-6 on any CPU); logits are <= 100 x cosines: the loss moves by < 1e-4.
    torch.testing.assert_close(l_cached, l_plain, rtol=1e-4, atol=1e-4)
    # Exact (tolerance 0): the guide embeddings `g` are the same tensors in both paths and the veto mask
    # depends on nothing else, so both compute it from identical inputs with the identical kernel.
    assert s_cached["masked_frac"] == s_plain["masked_frac"]
    assert l_plain > 0.01 and s_plain["masked_frac"] < 0.9  # not everything vetoed
    assert g_plain.keys() == g_cached.keys() and len(g_plain) > 10
    assert sum(g.abs().sum() for g in g_plain.values()) > 0
    scale = max(g.abs().max().item() for g in g_plain.values())
    for name in g_plain:
        # rtol 1e-4; atol 1e-4 x the tensor's largest gradient, floored at 1e-5 x the model's largest: fp32
        # noise scales with the largest terms summed in backprop, so a tensor whose gradient is ~0 in exact
        # math (key bias) or tiny (embedding tables) is noise-dominated (measured noise <= 3e-6 x the largest).
        atol = 1e-4 * g_plain[name].abs().max().item() + 1e-5 * scale
        torch.testing.assert_close(
            g_cached[name], g_plain[name], rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_dropout_is_replayed_exactly(tiny_student, tiny_guide):
    student, feats, g = _setup(tiny_student, tiny_guide)
    student.model.config.hidden_dropout_prob = 0.3
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    student.train()
    loss_fn = lambda emb: GISTLoss()(emb, g)  # noqa: E731
    mini = 4

    # Reference: the same (trimmed) mini-batch forwards in the same RNG order, but with a graph.
    torch.manual_seed(123)
    student.zero_grad()
    emb = {k: torch.cat([student(chunk) for chunk in _chunks(f, mini)]) for k, f in feats.items()}
    ref_loss, _ = loss_fn(emb)
    ref_loss.backward()
    ref = _grads(student)

    torch.manual_seed(123)
    l_cached, _, cached = _cached(student, feats, loss_fn, mini)
    # Same mini-batch forwards, same dropout masks: only the backward's summation order differs (GradCache
    # backpropagates chunk by chunk). Loss: identical forwards, fp32 tolerance. Gradients: as above.
    torch.testing.assert_close(l_cached, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in ref.values())
    for name in ref:
        atol = 1e-4 * ref[name].abs().max().item() + 1e-5 * scale
        torch.testing.assert_close(
            cached[name], ref[name], rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )

    # ...and dropout really is on: another seed gives other gradients.
    torch.manual_seed(7)
    _, _, other = _cached(student, feats, loss_fn, mini)
    assert any(not torch.allclose(other[n], ref[n], rtol=1e-3, atol=1e-5) for n in ref)


def test_gradient_scale_from_caller_is_applied(tiny_student, tiny_guide):
    student, feats, g = _setup(tiny_student, tiny_guide)
    student.eval()
    loss_fn = lambda emb: GISTLoss()(emb, g)  # noqa: E731
    _, _, full = _cached(student, feats, loss_fn, 4)
    student.zero_grad()
    loss, _ = cached_loss(student, feats, loss_fn, 4)
    (loss * 0.25).backward()  # e.g. accumulate_grad_batches=4
    # The same computation run twice, scaled by a power of two (exact in floating point): tight tolerance.
    for name, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, full[name] * 0.25, rtol=1e-5, atol=1e-8)


def test_mini_batch_size_is_validated():
    with pytest.raises(ValueError, match="mini_batch_size"):
        GISTLoss(mini_batch_size=0)

"""Matryoshka embeddings for any loss (`loss.matryoshka_dims`): the full width alone is the plain loss,
several widths are the weighted sum of the truncated losses, the guide's vetoes are computed once, GradCache
composes with it, and the evaluation can truncate (`truncate_dim`)."""

from __future__ import annotations

import pytest
import torch

from gist.core import losses
from gist.core.loss_modules import GISTLoss, MNRLLoss, NoGuideLoss

pytestmark = pytest.mark.unit

B, D = 6, 32


def _embeddings(seed: int = 0, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    student = {
        k: torch.randn(B, D, generator=g).requires_grad_(requires_grad) for k in ("anchor", "positive", "negative")
    }
    guide = {k: torch.randn(B, 24, generator=g) for k in ("anchor", "positive", "negative")}
    return student, guide


def _grads(loss_module, student, guide):
    loss, stats = loss_module(student, guide if loss_module.requires_guide else None)
    grads = torch.autograd.grad(loss, list(student.values()))
    return loss.detach(), grads, stats


@pytest.mark.parametrize("cls", [GISTLoss, NoGuideLoss, MNRLLoss])
def test_the_full_width_alone_equals_the_plain_loss(cls):
    student, guide = _embeddings()
    plain = _grads(cls(), student, guide)
    full = _grads(cls(matryoshka_dims=[D]), student, guide)
    # The same function of the same tensors (the loss normalises the truncated = untruncated vectors).
    torch.testing.assert_close(full[0], plain[0], rtol=0, atol=1e-6)
    for a, b in zip(full[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_several_widths_are_the_weighted_sum_of_truncated_losses_with_one_guide_mask(monkeypatch):
    student, guide = _embeddings(1)
    dims, weights = [32, 16, 8], [1.0, 0.5, 0.25]
    calls = []
    real = losses.guide_mask

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "guide_mask", counting)
    monkeypatch.setattr("gist.core.loss_modules.guide_mask", counting)
    loss, stats = GISTLoss(matryoshka_dims=dims, matryoshka_weights=weights)(student, guide)
    assert len(calls) == 1  # the guide's vetoes: once per step, shared by every width
    expected = sum(
        w
        * losses.gist_loss(
            *(student[k][:, :d] for k in ("anchor", "positive", "negative")),
            guide_anchor=guide["anchor"],
            guide_positive=guide["positive"],
            guide_negative=guide["negative"],
        )[0]
        for d, w in zip(dims, weights)
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert set(stats) >= {"masked_frac", "loss_dim32", "loss_dim16", "loss_dim8"}
    assert stats["loss_dim8"] != stats["loss_dim32"]


def test_bad_matryoshka_settings_are_errors():
    with pytest.raises(ValueError, match="distinct positive"):
        GISTLoss(matryoshka_dims=[64, 64])
    with pytest.raises(ValueError, match="one weight per dim"):
        MNRLLoss(matryoshka_dims=[64, 32], matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match="without loss.matryoshka_dims"):
        MNRLLoss(matryoshka_weights=[1.0])
    student, guide = _embeddings()
    with pytest.raises(ValueError, match=r"\[1, 32\]"):
        NoGuideLoss(matryoshka_dims=[64, 16])(student)


def test_gradcache_composes_with_matryoshka(tiny_student, tiny_guide):
    """GradCache over the Matryoshka loss = the plain Matryoshka loss: loss and parameter gradients."""
    from gist.core.bucketing import encode_blocks
    from gist.core.encoder import Encoder

    enc = Encoder(str(tiny_student)).eval()
    guide = Encoder(str(tiny_guide)).eval()
    texts = {
        "anchor": ["the cat sat", "a dog runs", "i love pizza", "bank card money", "the plane is flying", "joy"],
        "positive": ["cat on a mat", "dog walks", "pizza with cheese", "my account", "taking off", "happy"],
    }
    features = {b: enc.tokenize(v) for b, v in texts.items()}
    with torch.no_grad():
        guide_emb = {b: guide(guide.tokenize(v)) for b, v in texts.items()}
    ids = (torch.arange(6), torch.arange(6, 12), None)

    def run(mini_batch_size):
        enc.zero_grad()
        loss_module = GISTLoss(matryoshka_dims=[32, 16, 8], mini_batch_size=mini_batch_size)
        loss, _ = loss_module.batch_loss(enc, features, guide_emb, ids, encode=lambda e, f: encode_blocks(e, f))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    ref_loss, ref = run(None)
    got_loss, got = run(2)
    torch.testing.assert_close(got_loss, ref_loss, rtol=0, atol=1e-4)  # loss atol 1e-4, as for GradCache alone
    scale = max(g.abs().max().item() for g in ref.values())
    for n in ref:  # gradients: 1e-4 x the largest + 1e-5 (tests/test_gradcache.py's tolerance)
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-4 * scale + 1e-5, msg=n)


def test_eval_truncates_to_a_dimension(tiny_student, mteb_dir, tmp_path):
    from gist.evaluation.cli import EvalArgumentError, evaluate_model

    full = evaluate_model(str(tiny_student), data_dir=mteb_dir, tasks=["TinySTS"], output=tmp_path / "full.json")
    cut = evaluate_model(
        str(tiny_student), data_dir=mteb_dir, tasks=["TinySTS"], output=tmp_path / "d8.json", truncate_dim=8
    )
    assert set(full) == set(cut) == {"TinySTS"} and full["TinySTS"] != cut["TinySTS"]
    details = (tmp_path / "d8.details.json").read_text()
    assert '"truncate_dim": 8' in details
    with pytest.raises(EvalArgumentError, match=r"\[1, 32\]"):
        evaluate_model(
            str(tiny_student), data_dir=mteb_dir, tasks=["TinySTS"], output=tmp_path / "x.json", truncate_dim=64
        )

"""The LightningModule: the guide is frozen in one place and never trained, optimized or checkpointed."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from gist.core.encoder import Encoder
from gist.core.loss_modules import GISTLoss, MNRLLoss
from gist.core.module import GISTModule
from gist.data.datamodule import GISTDataModule


def _fit(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, loss=None, steps=4):
    student, guide = Encoder(str(tiny_student)), Encoder(str(tiny_guide))
    module = GISTModule(student, loss or GISTLoss(), guide, lr=1e-3, warmup_steps=1)
    dm = GISTDataModule(
        train_files=[str(gist_file)], batch_size=8, val_sts_dir=str(mteb_dir / "TinySTS"), val_batch_size=8
    )
    dm.configure_encoders(student, module.guide)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_guide_is_frozen_after_validation_and_absent_from_optimizer_and_checkpoint(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir
):
    module, trainer = _fit(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir)
    guide_before = {k: v.clone() for k, v in module.guide.state_dict().items()}
    assert trainer.global_step == 4 and "val/stsb_spearman" in trainer.callback_metrics
    assert not module.guide.training and not module.guide.encoder.model.training
    assert module.student.training
    assert all(not p.requires_grad for p in module.guide.parameters())
    guide_params = {id(p) for p in module.guide.parameters()}
    opt_params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert opt_params and not any(id(p) in guide_params for p in opt_params)
    # Every student parameter except the model's unused pooler (frozen: DDP would wait for its gradients).
    pooler = {id(p) for p in module.student.model.pooler.parameters()}
    assert pooler and not any(id(p) in pooler for p in opt_params)
    assert len(opt_params) == len(list(module.student.parameters())) - len(pooler)
    ckpt_path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("student.") for k in ckpt["state_dict"])
    assert ckpt["gist_student"]["pooling"] == "mean"
    for k, v in module.guide.state_dict().items():
        torch.testing.assert_close(v, guide_before[k])


def test_student_learns_and_guide_does_not_change(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    ref_student = Encoder(str(tiny_student)).state_dict()
    ref_guide = Encoder(str(tiny_guide)).state_dict()
    module, _ = _fit(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, steps=3)
    assert any(not torch.equal(v, ref_student[k]) for k, v in module.student.state_dict().items())
    for k, v in module.guide.encoder.state_dict().items():
        torch.testing.assert_close(v, ref_guide[k])


def test_loss_needing_a_guide_without_one_is_a_config_error(tiny_student):
    with pytest.raises(ValueError, match="needs a guide"):
        GISTModule(Encoder(str(tiny_student)), GISTLoss(), None)


def test_a_guide_with_a_guide_free_loss_is_an_error_not_silently_dropped(tiny_student, tiny_guide):
    """check_guide owns the decision: a guide that the loss would ignore stops the run (it used to be
    dropped silently, and guide=none used to rewrite the loss group)."""
    from gist.core.module import GuideMismatchError

    with pytest.raises(GuideMismatchError, match="uses no guide.*guide=none"):
        GISTModule(Encoder(str(tiny_student)), MNRLLoss(), Encoder(str(tiny_guide)))
    with pytest.raises(GuideMismatchError, match="needs a guide"):
        GISTModule(Encoder(str(tiny_student)), GISTLoss())
    assert GISTModule(Encoder(str(tiny_student)), MNRLLoss()).guide is None


def test_lr_schedule_is_linear_warmup_then_linear_decay(tiny_student):
    module = GISTModule(Encoder(str(tiny_student)), MNRLLoss(), lr=1.0, warmup_steps=10, schedule_steps=110)
    config = module.configure_optimizers()
    sched = config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(111):
        lrs.append(sched.get_last_lr()[0])
        config["optimizer"].step()
        sched.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5) and lrs[110] == pytest.approx(0.0)


def test_bucketed_training_step_equals_per_block_step(tiny_student, tiny_guide, gist_file):
    """bucket_size changes how texts are batched through the encoders, not the loss or its gradients."""
    student, guide = Encoder(str(tiny_student)), Encoder(str(tiny_guide))
    student.eval()  # dropout off: the two paths must compute one function
    dm = GISTDataModule(train_files=[str(gist_file)], batch_size=8)
    dm.configure_encoders(student, guide)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.student["anchor"]["input_ids"].size(1) != batch.student["positive"]["input_ids"].size(1)
    import dataclasses

    from gist.core.losses import guide_mask

    modules = {size: GISTModule(student, GISTLoss(), guide, bucket_size=size) for size in (None, 3)}
    # 1. The guide through both paths (its live forward). Only fp32 summation order differs: rtol 1e-5 +
    # atol 1e-6 on unit vectors, on any CPU (measured <= 3e-8). The tiny guide scores every candidate
    # ~0.9999, some within 3e-7 of their cut-off, so such noise can flip vetoes: masks may differ only where the
    # plain score lies within 2 x tol of its plain cut-off, tol = |cosine change| <= 2 x (unit-vector change
    # <= 1e-6 sqrt(d) + 1e-5) + fp32 rounding of the two cosines (< 7e-6 at d = 48).
    with torch.no_grad():
        g_plain, g_bucketed = (modules[size]._guide_embeddings(batch) for size in (None, 3))
    for k in g_plain:
        torch.testing.assert_close(g_bucketed[k], g_plain[k], rtol=1e-5, atol=1e-6)
    v_plain, v_bucketed = (guide_mask(g["anchor"], g["positive"], g.get("negative")) for g in (g_plain, g_bucketed))
    tol = 2 * (1e-6 * g_plain["anchor"].size(1) ** 0.5 + 1e-5) + 7e-6
    borderline = (v_plain.sim - v_plain.cutoff).abs() <= 2 * tol
    assert not (v_plain.mask != v_bucketed.mask)[~borderline].any()

    # 2. The student through both paths, under one guide mask (the plain guide's embeddings, handed in as the
    # guide cache would): the loss and its gradients, not a veto flipped by noise, are compared here.
    batch = dataclasses.replace(batch, guide_emb=g_plain)
    results = []
    for module in modules.values():
        module.log = lambda *a, **k: None
        student.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    # Logits are 100 x student cosines whose fp32 error is < 1e-6 on any CPU: the loss moves by < 1e-4.
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-4)
    assert loss_a > 0.01  # not a batch whose every candidate the guide vetoed
    assert grads_a and len(grads_a) == len(grads_b) and sum(g.abs().sum() for g in grads_a) > 0
    # fp32 gradient noise scales with the largest gradient (some tensors' own gradients are below it; see
    # tests/test_encoder.py::test_encode_blocks_bucketed_equals_per_block): atol 1e-4 x the largest.
    scale = max(g.abs().max().item() for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * scale)
    with pytest.raises(ValueError, match="bucket_size"):
        GISTModule(student, GISTLoss(), guide, bucket_size=0)

"""Precision and the optimizer: AdamW stays fused under bf16-mixed and the gradients are still clipped.

Lightning's mixed-precision plugin refuses to clip the gradients of a fused optimizer (it assumes a loss
scaler, which bf16 does not use), so GISTModule clips them itself (`configure_gradient_clipping`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from gist.core.encoder import Encoder
from gist.core.loss_modules import GISTLoss
from gist.core.module import GISTModule
from gist.data.datamodule import GISTDataModule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class GradProbe(Callback):
    """The gradients before clipping (on_before_optimizer_step runs before it) and as the optimizer saw them."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []
        self.fused: list[bool] = []

    def _grads(self, module):
        return [p.grad.detach().clone() for p in module.student.parameters() if p.grad is not None]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(self._grads(pl_module))
        self.fused.append(bool(optimizer.defaults.get("fused")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._grads(pl_module))  # zero_grad only comes with the next step


def _fit(tmp_path, tiny_student, tiny_guide, gist_file, precision, clip, algorithm="norm", fused=None, steps=3):
    seed_everything(0)
    student, guide = Encoder(str(tiny_student)), Encoder(str(tiny_guide))
    module = GISTModule(student, GISTLoss(), guide, lr=1e-3, fused=fused)
    dm = GISTDataModule(train_files=[str(gist_file)], batch_size=8)
    dm.configure_encoders(student, module.guide)
    probe = GradProbe()
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        callbacks=[probe],
    )
    trainer.fit(module, datamodule=dm)
    return module, probe


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_the_fused_optimizer_clips_by_norm(tmp_path, tiny_student, tiny_guide, gist_file, precision):
    clip = 1e-3  # far below the tiny model's gradient norm: every step is clipped
    _, probe = _fit(tmp_path, tiny_student, tiny_guide, gist_file, precision, clip)
    assert probe.fused == [True] * 3  # fused AdamW under bf16-mixed too
    for before, after in zip(probe.before, probe.after, strict=True):
        norm = _norm(before)
        assert norm > 10 * clip
        assert _norm(after) == pytest.approx(clip, rel=1e-4)
        scale = clip / (norm + 1e-6)  # torch's clip_grad_norm_ coefficient
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a, b * scale, rtol=1e-5, atol=1e-12)


def test_the_fused_optimizer_clips_by_value_under_bf16(tmp_path, tiny_student, tiny_guide, gist_file):
    clip = 1e-4
    _, probe = _fit(tmp_path, tiny_student, tiny_guide, gist_file, "bf16-mixed", clip, algorithm="value")
    assert all(probe.fused)
    for before, after in zip(probe.before, probe.after, strict=True):
        assert max(float(g.abs().max()) for g in before) > clip
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a, b.clamp(-clip, clip), rtol=0, atol=0)


def test_without_clipping_the_gradients_are_untouched(tmp_path, tiny_student, tiny_guide, gist_file):
    _, probe = _fit(tmp_path, tiny_student, tiny_guide, gist_file, "bf16-mixed", None, steps=2)
    for before, after in zip(probe.before, probe.after, strict=True):
        for b, a in zip(before, after, strict=True):
            assert torch.equal(a, b)


def test_fused_and_foreach_adamw_train_alike_under_bf16(tmp_path, tiny_student, tiny_guide, gist_file):
    """Same seed, batches, dropout and bf16 forward: only the AdamW kernel differs (fp32 op order), so the
    weights after 3 clipped steps agree to fp32 rounding (lr 1e-3; measured <= 4e-7 on the tiny model)."""
    fused, _ = _fit(tmp_path / "a", tiny_student, tiny_guide, gist_file, "bf16-mixed", 1.0, fused=True)
    foreach, _ = _fit(tmp_path / "b", tiny_student, tiny_guide, gist_file, "bf16-mixed", 1.0, fused=False)
    initial = Encoder(str(tiny_student)).state_dict()
    moved = 0
    for (name, a), b in zip(fused.student.state_dict().items(), foreach.student.state_dict().values(), strict=True):
        if name.endswith("attention.self.key.bias"):
            # Softmax ignores a shift shared by every key, so this gradient is 0 up to rounding, and Adam
            # turns that noise into steps of ~lr whatever its size: no kernel-independent value to compare.
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
        moved += int(not torch.equal(a, initial[name]))
    assert moved > 10  # the steps did train


def test_fp16_loss_scaling_keeps_lightning_clipping_and_an_unfused_optimizer(tiny_student, tiny_guide):
    """Under 16-mixed (CUDA; Lightning turns it into bf16 on CPU) a GradScaler must unscale the gradients
    before they are clipped: that stays Lightning's job, with an unfused AdamW."""
    module = GISTModule(Encoder(str(tiny_student)), GISTLoss(), Encoder(str(tiny_guide)), schedule_steps=10)
    plugin = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    module._trainer = SimpleNamespace(precision_plugin=plugin, precision="16-mixed", max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert not optimizer.defaults["fused"]
    calls = []
    module.clip_gradients = lambda *args: calls.append(args)
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert calls == [(optimizer, 1.0, "norm")]

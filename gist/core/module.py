"""The LightningModule: a trainable student, a frozen guide and a contrastive loss.

Training step: encode anchor / positive / negative with the student (train mode) and, when the loss
needs it, with the guide (eval, no grad, its own tokenization from the collate step); the loss module
returns (loss, stats). Validation: cosine Spearman of the student on an STS split.

The guide is NOT a registered submodule: it stays out of `parameters()`, the optimizer, DDP's
gradient sync and `state_dict()` (so checkpoints hold the student only), yet follows the module's
`.to(device)` through `_apply`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.regression import SpearmanCorrCoef

from gist.core.bucketing import encode_blocks
from gist.core.encoder import Encoder, FrozenGuide
from gist.infra import distributed

if TYPE_CHECKING:  # annotations only: gist.core does not import gist.data at runtime
    from gist.data.collate import StsBatch, TrainBatch


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss, gradient or weight: the run stops before it can reach a checkpoint."""


class GuideMismatchError(ValueError):
    """The loss and the guide do not go together (a guided loss without a guide, or a guide that a
    guide-free loss would silently ignore)."""


def check_guide(loss: nn.Module, has_guide: bool) -> None:
    """The one place that decides whether a run has a guide: exactly when its loss needs one
    (`loss.requires_guide`). gist.train calls it before loading any model; GISTModule calls it too."""
    needs = bool(getattr(loss, "requires_guide", False))
    if needs and not has_guide:
        raise GuideMismatchError(
            f"loss {type(loss).__name__} needs a guide model but none is set (guide=none): choose one "
            "(guide=mpnet, guide=minilm, ...) or a guide-free loss (loss=no_guide, loss=mnrl)"
        )
    if has_guide and not needs:
        raise GuideMismatchError(
            f"loss {type(loss).__name__} uses no guide, but a guide is set: add guide=none "
            "(or choose a guided loss: loss=gist, loss=gist_cached)"
        )


class GISTModule(LightningModule):
    """Args:
    student: the encoder being trained.
    loss: a loss module from gist.core.loss_modules (`requires_guide` says whether it uses the guide; it
        runs GradCache and cross-device gathering itself: `batch_loss`).
    guide: the guide encoder (frozen here), or None for guide-free losses.
    lr / weight_decay / betas / eps: AdamW.
    fused: AdamW's fused kernel (one pass over the parameters; CPU and CUDA). None: on when every
        trainable parameter is a float tensor on CPU or CUDA and no fp16 loss scaler is active (under
        `16-mixed` the scaler unscales before clipping, which a fused optimizer would do itself). Under
        `32-true` and `bf16-mixed` the gradients are clipped here (`configure_gradient_clipping`), because
        Lightning's mixed-precision plugin refuses to clip for a fused optimizer even when nothing is scaled.
    warmup_steps: linear warm-up from 0 to lr.
    schedule_steps: step at which the linear decay reaches 0; None = trainer.max_steps. GIST's released
        checkpoints stopped inside a much longer schedule, so this is separate from max_steps.
    guide_cache: a `gist.core.guide_cache.GuideCache`; batches whose guide embeddings the collator found
        there skip the guide forward, the others are computed live and written to it.
    bucket_size: embed the texts of all blocks of a step in length-sorted buckets of this many texts,
        each padded only to its own longest text (same embeddings and gradients, fewer padded tokens;
        see gist.core.bucketing.encode_blocks). None: one forward per block. Applies to the student and the
        live guide unless they pack (Encoder packing=True: one padding-free forward per step); GradCache
        (loss mini_batch_size) keeps its own mini-batches.
    bucket_tokens: also cap each bucket at this many padded tokens (texts x longest text): many short
        texts or few long ones per forward. With bucket_size None, buckets are sized by tokens alone.
    """

    def __init__(
        self,
        student: Encoder,
        loss: nn.Module,
        guide: Encoder | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        schedule_steps: int | None = None,
        guide_cache=None,
        bucket_size: int | None = None,
        bucket_tokens: int | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        check_guide(loss, guide is not None)
        if warmup_steps < 0 or (schedule_steps is not None and schedule_steps <= warmup_steps):
            raise ValueError(f"need 0 <= warmup_steps < schedule_steps, got {warmup_steps}, {schedule_steps}")
        self.student = student
        self.loss_fn = loss
        self.__dict__["guide"] = FrozenGuide(guide) if guide is not None else None
        self.guide_cache = guide_cache if self.guide is not None else None
        self.optim = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        self.fused = fused
        self.warmup_steps, self.schedule_steps = warmup_steps, schedule_steps
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1 or null, got {bucket_size}")
        if bucket_tokens is not None and bucket_tokens < 1:
            raise ValueError(f"bucket_tokens must be >= 1 or null, got {bucket_tokens}")
        self.bucket_size, self.bucket_tokens = bucket_size, bucket_tokens
        self.val_spearman = SpearmanCorrCoef()
        self._grad_norm: torch.Tensor | None = None  # this step's gradient norm (on_before_optimizer_step)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.guide is not None:
            self.guide._apply(fn, *args, **kwargs)
        return self

    def _encode(self, encoder: nn.Module, features: dict) -> dict[str, torch.Tensor]:
        return encode_blocks(encoder, features, self.bucket_size, self.bucket_tokens)

    def _ddp_wrapper(self):
        """The DistributedDataParallel module wrapping this one (Lightning's DDP strategies), else None."""
        trainer = self._trainer
        model = getattr(getattr(trainer, "strategy", None), "model", None) if trainer is not None else None
        return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        ids = batch.text_ids
        text_ids = (ids["anchor"], ids["positive"], ids.get("negative"))
        guide = self._guide_embeddings(batch)
        loss, stats = self.loss_fn.batch_loss(
            self.student, batch.student, guide, text_ids, encode=self._encode, ddp=self._ddp_wrapper()
        )
        # Every rank must agree, else one raises while the others wait in the backward's all-reduce.
        if not distributed.all_ranks_true(bool(torch.isfinite(loss)), loss.device):
            raise NonFiniteError(
                f"non-finite training loss ({loss.item()} on this rank) at step {self.global_step} "
                f"(task {batch.task!r}): stopping before the optimizer step, so no checkpoint is written "
                "from it; the last checkpoint holds the last good weights"
            )
        B = batch.size
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/masked_frac", stats["masked_frac"], prog_bar=True, batch_size=B)
        self.log("train/effective_negatives", stats["effective_negatives"], batch_size=B)
        return loss

    def _guide_embeddings(self, batch: TrainBatch) -> dict[str, torch.Tensor] | None:
        if self.guide is None:
            return None
        if batch.guide_emb is not None:  # from the cache: no guide forward in this step
            return {k: v.to(self.device) for k, v in batch.guide_emb.items()}
        guide = self._encode(self.guide, batch.guide)
        if self.guide_cache is not None:
            ids = batch.guide_text_ids or batch.text_ids
            for block, emb in guide.items():
                self.guide_cache.add(ids[block], emb)
        return guide

    def on_train_end(self) -> None:
        if self.guide_cache is not None:
            self.guide_cache.flush()

    def validation_step(self, batch: StsBatch, batch_idx: int) -> None:
        e1, e2 = self.student(batch.sentence1), self.student(batch.sentence2)
        self.val_spearman.update((e1 * e2).sum(-1).float(), batch.score)

    def on_validation_epoch_end(self) -> None:
        self.log("val/stsb_spearman", self.val_spearman.compute(), prog_bar=True)
        self.val_spearman.reset()

    def on_train_epoch_start(self) -> None:
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):  # a new seeded batch order each epoch
            dataset.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        fused = self.fused
        if fused is None:
            fused = not self._loss_scaling() and all(
                p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
            )
        optimizer = torch.optim.AdamW(params, **self.optim, fused=fused)
        total = self.schedule_steps or self.trainer.max_steps
        if total is None or total <= 0 or total == math.inf:
            raise ValueError(
                "the LR schedule needs trainer.max_steps or optim.schedule_steps (streamed data has no length)"
            )
        warmup = self.warmup_steps

        def linear(step: int) -> float:
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def _loss_scaling(self) -> bool:
        """An fp16 gradient scaler is active (`16-mixed`): gradients must be unscaled before anything reads them."""
        plugin = getattr(self._trainer, "precision_plugin", None) if self._trainer is not None else None
        return getattr(plugin, "scaler", None) is not None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the (already rank-averaged) gradients before the optimizer step. Without a loss scaler the
        gradients are true gradients, so we clip them ourselves: Lightning's mixed-precision plugin would refuse
        to for a fused optimizer even under bf16, where nothing is scaled. The norm is the one
        `on_before_optimizer_step` already computed for its finiteness check (one pass over the gradients)."""
        if not gradient_clip_val:
            return
        if self._loss_scaling():
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
            return
        norm = self._grad_norm
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm, foreach=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give inf/NaN gradients (overflow in backward); stepping on them would
        put NaN into the weights and the next checkpoint. Gradients are already averaged over ranks
        here, so every rank decides alike. Skipped under fp16 loss scaling, whose scaler skips such
        steps by design."""
        self._grad_norm = None
        if self._loss_scaling():
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        self._grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # one pass; reused for clipping
        if not torch.isfinite(self._grad_norm):
            bad = [
                n for n, p in self.student.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            raise NonFiniteError(
                f"non-finite gradients at step {self.global_step} in {len(bad)} tensors (first: {bad[0]}): stopping "
                "before the optimizer step; the last checkpoint holds the last good weights"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never replace a good checkpoint by a broken one
            raise NonFiniteError(
                f"refusing to save a checkpoint at step {self.global_step}: non-finite weights in {bad[:3]}"
            )
        if self.student.lora:  # only the adapters train: the frozen base weights stay out of checkpoints
            trainable = {f"student.{n}" for n, p in self.student.named_parameters() if p.requires_grad}
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("student.") and k not in trainable]:
                del state[key]
        # What it takes to rebuild the student around the saved weights (gist.evaluation.runs / export from a ckpt).
        checkpoint["gist_student"] = self.student.settings()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """With LoRA a checkpoint holds the adapters only (Encoder.check_loaded decides what may be missing)."""
        if not self.student.lora:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            self.student.check_loaded(result, prefix="student.")
        return result

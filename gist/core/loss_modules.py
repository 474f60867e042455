"""The `loss=` group: each module holds a loss's hyper-parameters AND the two levers that change how a
batch's loss is computed but not its value, and executes them in `batch_loss`:

- `mini_batch_size` (GradCache, gist/core/gradcache.py): the loss over the whole batch, student
  activations of `mini_batch_size` texts at a time; same loss and gradients (`loss=gist_cached`);
- `gather_across_devices` (gist/infra/distributed.py): under DDP, candidates (positives, negatives, the
  aa block's anchors), their guide embeddings and text ids from every rank; anchors stay local.

and, for any loss, `matryoshka_dims` / `matryoshka_weights` (Matryoshka embeddings: the weighted sum of
the loss at each truncated width; GIST's guide vetoes are computed once per step and shared).

The loss values themselves are the pure functions of gist/core/losses.py. Adding a loss: one function
there, one subclass here (its `_loss`), one yaml in conf/loss/.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from gist.core.gradcache import cached_loss
from gist.core.losses import MarginStrategy, gist_loss, guide_mask, matryoshka_loss, mnrl_loss, no_guide_loss
from gist.infra import distributed

Embeddings = dict[str, Tensor]
Encode = Callable[[nn.Module, dict], Embeddings]


class LossModule(nn.Module):
    """What every loss module shares: a checked temperature, the text-identity mask switch, and the
    execution of GradCache and cross-device gathering."""

    requires_guide = False

    def __init__(
        self,
        temperature: float,
        mask_duplicate_texts: bool,
        mini_batch_size: int | None,
        gather_across_devices: bool,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if matryoshka_dims is not None:
            dims = [int(d) for d in matryoshka_dims]
            if not dims or any(d < 1 for d in dims) or len(set(dims)) != len(dims):
                raise ValueError(f"loss.matryoshka_dims must be distinct positive widths, got {list(matryoshka_dims)}")
            if matryoshka_weights is not None and len(matryoshka_weights) != len(dims):
                raise ValueError(
                    f"loss.matryoshka_weights needs one weight per dim ({len(dims)}), got {list(matryoshka_weights)}"
                )
        elif matryoshka_weights is not None:
            raise ValueError("loss.matryoshka_weights without loss.matryoshka_dims")
        self.matryoshka_dims = [int(d) for d in matryoshka_dims] if matryoshka_dims else None
        self.matryoshka_weights = [float(w) for w in matryoshka_weights] if matryoshka_weights else None
        if not temperature > 0:
            raise ValueError(f"loss.temperature must be > 0 (GIST uses 0.01), got {temperature}")
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ValueError(f"loss.mini_batch_size must be >= 1 (GradCache) or null (plain), got {mini_batch_size}")
        self.temperature = temperature
        self.mini_batch_size = mini_batch_size
        self.gather_across_devices = gather_across_devices
        self.mask_duplicate_texts = mask_duplicate_texts

    def _loss(
        self, student: Embeddings, guide: Embeddings | None, text_ids: tuple | None, target_offset: int, shared=None
    ):
        raise NotImplementedError

    def _shared(self, guide: Embeddings | None, target_offset: int):
        """What every Matryoshka dimension shares (the guide's veto for GIST); None here."""
        return None

    def forward(
        self,
        student: Embeddings,
        guide: Embeddings | None = None,
        text_ids: tuple | None = None,
        target_offset: int = 0,
    ) -> tuple[Tensor, dict]:
        """The loss of embeddings already computed (and already gathered, when target_offset > 0); with
        matryoshka_dims, the weighted sum over truncated widths (gist.core.losses.matryoshka_loss), the
        guide's vetoes computed once."""
        text_ids = text_ids if self.mask_duplicate_texts else None
        if not self.matryoshka_dims:
            return self._loss(student, guide, text_ids, target_offset)
        shared = self._shared(guide, target_offset)
        return matryoshka_loss(
            lambda truncated: self._loss(truncated, guide, text_ids, target_offset, shared),
            student,
            self.matryoshka_dims,
            self.matryoshka_weights,
        )

    def _on_all_ranks(self, student: Embeddings, guide: Embeddings | None, text_ids: tuple) -> tuple[Tensor, dict]:
        if self.gather_across_devices:
            student, guide, text_ids, offset = distributed.gather_for_loss(student, guide, text_ids)
            return self(student, guide, text_ids, target_offset=offset)
        return self(student, guide, text_ids)

    def batch_loss(
        self,
        encoder: nn.Module,
        features: dict[str, dict],
        guide: Embeddings | None,
        text_ids: tuple,
        encode: Encode,
        ddp: nn.Module | None = None,
    ) -> tuple[Tensor, dict]:
        """Encode this rank's tokenized blocks with `encoder` (through `encode`) and return the batch's loss
        and stats, with GradCache and cross-device gathering as configured. `ddp`: the DDP wrapper of the
        training module, if any (GradCache suspends its per-backward sync and averages once)."""
        if not self.mini_batch_size:
            return self._on_all_ranks(encode(encoder, features), guide, text_ids)
        # One backward per replayed mini-batch: DDP's all-reduce is suspended for this step and the
        # gradients are averaged once after the last mini-batch.
        sync = distributed.suspend_ddp_sync(ddp)

        def after_replay() -> None:
            if sync:
                distributed.average_gradients(encoder.parameters())
            distributed.resume_ddp_sync(ddp, sync)

        return cached_loss(
            encoder,
            features,
            lambda student: self._on_all_ranks(student, guide, text_ids),
            self.mini_batch_size,
            after_replay=after_replay,
        )


class GISTLoss(LossModule):
    """`gist_loss` with fixed hyper-parameters. Inputs: dicts of anchor/positive/negative embeddings for
    the student (B, d) and the guide, and optional text ids; returns (loss, stats).

    Recommendations: temperature 0.01 (GIST v0); margin 0 unless the guide is much weaker than the
    student; mask_duplicate_texts when a task repeats texts (e.g. symmetric pairs)."""

    requires_guide = True

    def __init__(
        self,
        temperature: float = 0.01,
        margin_strategy: MarginStrategy = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        mask_self_pairs: bool = False,
        mask_duplicate_texts: bool = False,
        mini_batch_size: int | None = None,
        gather_across_devices: bool = False,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
    ) -> None:
        super().__init__(
            temperature,
            mask_duplicate_texts,
            mini_batch_size,
            gather_across_devices,
            matryoshka_dims,
            matryoshka_weights,
        )
        if margin_strategy not in ("absolute", "relative"):
            raise ValueError(f"loss.margin_strategy must be 'absolute' or 'relative', got {margin_strategy!r}")
        self.kwargs = dict(
            temperature=temperature,
            margin_strategy=margin_strategy,
            margin=margin,
            contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives,
            mask_self_pairs=mask_self_pairs,
        )

    def _loss(self, student, guide, text_ids, target_offset, shared=None):
        return gist_loss(
            student["anchor"],
            student["positive"],
            student.get("negative"),
            guide_anchor=guide["anchor"],
            guide_positive=guide["positive"],
            guide_negative=guide.get("negative"),
            text_ids=text_ids,
            target_offset=target_offset,
            anchor_candidates=student.get("anchor_candidates"),
            guide_anchor_candidates=guide.get("anchor_candidates"),
            veto=shared,
            **self.kwargs,
        )

    def _shared(self, guide, target_offset):
        k = self.kwargs
        with torch.no_grad():
            return guide_mask(
                guide["anchor"],
                guide["positive"],
                guide.get("negative"),
                guide_anchor_candidates=guide.get("anchor_candidates"),
                margin_strategy=k["margin_strategy"],
                margin=k["margin"],
                contrast_anchors=k["contrast_anchors"],
                contrast_positives=k["contrast_positives"],
                target_offset=target_offset,
            )


class NoGuideLoss(LossModule):
    """`no_guide_loss` with fixed hyper-parameters (the GIST loss with every guide veto removed)."""

    def __init__(
        self,
        temperature: float = 0.01,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        mask_duplicate_texts: bool = False,
        mini_batch_size: int | None = None,
        gather_across_devices: bool = False,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
    ) -> None:
        super().__init__(
            temperature,
            mask_duplicate_texts,
            mini_batch_size,
            gather_across_devices,
            matryoshka_dims,
            matryoshka_weights,
        )
        self.kwargs = dict(
            temperature=temperature, contrast_anchors=contrast_anchors, contrast_positives=contrast_positives
        )

    def _loss(self, student, guide, text_ids, target_offset, shared=None):
        return no_guide_loss(
            student["anchor"],
            student["positive"],
            student.get("negative"),
            text_ids=text_ids,
            target_offset=target_offset,
            anchor_candidates=student.get("anchor_candidates"),
            **self.kwargs,
        )


class MNRLLoss(LossModule):
    """`mnrl_loss` with a fixed temperature (plain in-batch negatives, [ap | an]; no aa block, so gathered
    anchors are unused)."""

    def __init__(
        self,
        temperature: float = 0.05,
        mask_duplicate_texts: bool = False,
        mini_batch_size: int | None = None,
        gather_across_devices: bool = False,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
    ) -> None:
        super().__init__(
            temperature,
            mask_duplicate_texts,
            mini_batch_size,
            gather_across_devices,
            matryoshka_dims,
            matryoshka_weights,
        )

    def _loss(self, student, guide, text_ids, target_offset, shared=None):
        return mnrl_loss(
            student["anchor"],
            student["positive"],
            student.get("negative"),
            temperature=self.temperature,
            text_ids=text_ids,
            target_offset=target_offset,
        )

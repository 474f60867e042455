"""Contrastive losses over embeddings: GISTEmbed, its no-guide 4-block baseline, and plain MNRL.

The losses are pure functions: embeddings (and guide embeddings) in, `(loss, stats)` out. Encoding,
tokenization, GradCache and cross-device gathering live in gist/core/loss_modules.py (the `loss=` group's
modules, which hold the hyper-parameters and run those two levers) and gist/infra/distributed.py.

Candidate layout for anchor row i (C columns; GISTEmbed, arXiv:2402.16829; sentence-transformers'
GISTEmbedLoss):

    [ S^ap_i. (P) | S^an_i. (N) | S^aa_i. (B) | S^pp_i. (P) ] / temperature,   target column = offset + i

B local anchors, P positives (P = B, or world_size * B when candidates were gathered across devices,
`target_offset = rank * B`), N = all hard negatives in the batch (every anchor sees every negative).

    python -m pytest tests/test_losses.py   # golden tests against sentence-transformers' GISTEmbedLoss
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

MarginStrategy = Literal["absolute", "relative"]


def _as_candidates(negative: Tensor | None) -> Tensor | None:
    """(B, d) or (B, k, d) hard negatives -> (B*k, d); None stays None."""
    if negative is None:
        return None
    if negative.dim() == 3:
        return negative.reshape(-1, negative.size(-1))
    if negative.dim() != 2:
        raise ValueError(f"negative must be (B, d) or (B, k, d), got shape {tuple(negative.shape)}")
    return negative


def _cos(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarity matrix (n, d) x (m, d) -> (n, m), in fp32 (also inside a bf16/fp16 autocast
    region, which would otherwise run the matmul in low precision: logits at 1/tau = 100 need fp32)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=1e-8)
        y = F.normalize(y.float(), dim=-1, eps=1e-8)
        return x @ y.T


def _blocks(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor | None,
    *,
    contrast_anchors: bool,
    contrast_positives: bool,
    target_offset: int,
    anchor_candidates: Tensor | None = None,
) -> tuple[Tensor, dict[str, slice]]:
    """Similarity blocks [ap | an | aa | pp] for the local anchors, concatenated: (B, C). The aa block
    compares with `anchor_candidates` (all ranks' anchors, own anchor at target_offset + i) when given."""
    B = anchor.size(0)
    blocks, spans, start = [], {}, 0

    def add(name: str, sim: Tensor) -> None:
        nonlocal start
        blocks.append(sim)
        spans[name] = slice(start, start + sim.size(1))
        start += sim.size(1)

    add("ap", _cos(anchor, positive))  # (B, P)
    if negative is not None:
        add("an", _cos(anchor, negative))  # (B, N)
    if contrast_anchors:
        add("aa", _cos(anchor, anchor if anchor_candidates is None else anchor_candidates))  # (B, B) or (B, P)
    if contrast_positives:
        add("pp", _cos(positive[target_offset : target_offset + B], positive))  # (B, P)
    return torch.cat(blocks, dim=1), spans


def _self_pair_mask(spans: dict[str, slice], B: int, C: int, target_offset: int, device) -> Tensor:
    """True at each row's own anchor in the aa block and own positive in the pp block: (B, C)."""
    mask = torch.zeros(B, C, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)
    if "aa" in spans:
        own = rows if spans["aa"].stop - spans["aa"].start == B else target_offset + rows
        mask[rows, spans["aa"].start + own] = True
    if "pp" in spans:
        mask[rows, spans["pp"].start + target_offset + rows] = True
    return mask


def _text_identity_mask(
    text_ids: tuple[Tensor, Tensor, Tensor | None],
    spans: dict[str, slice],
    B: int,
    target_offset: int,
) -> Tensor:
    """True where a candidate's raw text equals row i's positive text (ids are text hashes): (B, C)."""
    anchor_ids, positive_ids, negative_ids = text_ids
    columns = {"ap": positive_ids, "an": negative_ids, "aa": anchor_ids, "pp": positive_ids}
    cand = torch.cat([columns[name].reshape(-1) for name in spans])  # (C,)
    own_positive = positive_ids.reshape(-1)[target_offset : target_offset + B]  # (B,)
    return cand.unsqueeze(0) == own_positive.unsqueeze(1)


def _infonce(sim: Tensor, mask: Tensor, *, temperature: float, target_offset: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy over masked logits; the target column (offset + i) is never masked."""
    B, C = sim.shape
    rows = torch.arange(B, device=sim.device)
    target = rows + target_offset
    mask = mask.clone()
    mask[rows, target] = False
    logits = sim.masked_fill(mask, float("-inf")) / temperature  # (B, C), fp32
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        unmasked = (~mask).sum(dim=1).float()  # includes the target
        stats = {
            "masked_frac": mask.float().mean(),
            "effective_negatives": (unmasked - 1).mean(),
            "candidates": torch.tensor(float(C), device=sim.device),
        }
    return loss, stats


def _check_shapes(anchor: Tensor, positive: Tensor, target_offset: int) -> None:
    if anchor.dim() != 2 or positive.dim() != 2:
        raise ValueError(f"anchor and positive must be (B, d); got {tuple(anchor.shape)}, {tuple(positive.shape)}")
    if not 0 <= target_offset <= positive.size(0) - anchor.size(0):
        raise ValueError(
            f"target_offset={target_offset} does not fit {anchor.size(0)} anchors into {positive.size(0)} positives"
        )


class GuideVeto(NamedTuple):
    mask: Tensor  # (B, C) True = candidate vetoed
    sim: Tensor  # (B, C) guide similarities
    threshold: Tensor  # (B, 1) t_i, the guide's anchor-positive similarity
    cutoff: Tensor  # (B, 1) candidates scored strictly above it are vetoed


def guide_mask(
    guide_anchor: Tensor,
    guide_positive: Tensor,
    guide_negative: Tensor | None = None,
    *,
    margin_strategy: MarginStrategy = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    target_offset: int = 0,
    guide_anchor_candidates: Tensor | None = None,
) -> GuideVeto:
    """The guide's vetoes alone: mask (B, C), guide similarities (B, C), t_i and cut-off (B, 1).

    mask[i, j] is True where the guide scores candidate j above row i's cut-off, `t_i - margin`
    (absolute) or `t_i - |t_i| * margin` (relative), t_i = G^ap_{i, offset+i}; the target column is
    never above its own cut-off at margin >= 0. Candidate layout and args as in `gist_loss`.
    """
    guide_negative = _as_candidates(guide_negative)
    guide_sim, spans = _blocks(
        guide_anchor,
        guide_positive,
        guide_negative,
        anchor_candidates=guide_anchor_candidates,
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
        target_offset=target_offset,
    )  # (B, C)
    B = guide_anchor.size(0)
    rows = torch.arange(B, device=guide_sim.device)
    threshold = guide_sim[rows, spans["ap"].start + target_offset + rows].unsqueeze(1)  # (B, 1)
    cutoff = threshold - margin if margin_strategy == "absolute" else threshold - threshold.abs() * margin
    return GuideVeto(guide_sim > cutoff, guide_sim, threshold, cutoff)


def gist_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor | None = None,
    *,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    guide_negative: Tensor | None = None,
    temperature: float = 0.01,
    margin_strategy: MarginStrategy = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    mask_self_pairs: bool = False,
    text_ids: tuple[Tensor, Tensor, Tensor | None] | None = None,
    target_offset: int = 0,
    anchor_candidates: Tensor | None = None,
    guide_anchor_candidates: Tensor | None = None,
    veto: GuideVeto | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GISTEmbed loss: InfoNCE over in-batch candidates, minus those the guide ranks above the positive.

    Args:
        anchor: student anchor embeddings (B, d).
        positive: student positive embeddings (P, d); P = B, or all ranks' positives when gathered.
        negative: student hard negatives (B, d) or (B, k, d) (or gathered (N, d)), or None.
        guide_anchor / guide_positive / guide_negative: the frozen guide's embeddings of the same texts,
            same leading shapes (any width).
        temperature: logits are cos / temperature (GIST v0: 0.01).
        margin_strategy: "absolute" masks G_ij > t_i - margin; "relative" masks G_ij > t_i - |t_i| * margin,
            with t_i = G^ap_{i, offset+i} the guide's anchor-positive similarity. Comparison is strict.
        margin: see margin_strategy; 0 masks exactly the candidates the guide scores above the positive.
        contrast_anchors / contrast_positives: include the aa / pp blocks.
        mask_self_pairs: always mask each row's own anchor (aa) and positive (pp). Off by default: then
            they are masked only because G_ii ~ 1 > t_i, as in the original.
        text_ids: (anchor, positive, negative) integer ids of the raw texts (equal text <=> equal id);
            when given, candidates whose text equals row i's positive text are masked.
        target_offset: column of row 0's positive (rank * B under cross-device gather).
        anchor_candidates / guide_anchor_candidates: every rank's anchors (P, d) for the aa block under
            cross-device gather (own anchor at target_offset + i); None = the local anchors. Text ids
            are then every rank's too.
        veto: `guide_mask(...)` of these guide embeddings with the same layout, margin and strategy,
            computed once and shared (Matryoshka dimensions); None = computed here.

    Returns:
        loss (scalar, fp32) and stats: masked_frac (fraction of the B x C candidate logits masked),
        effective_negatives (mean unmasked non-target candidates per anchor), candidates (C),
        guide_threshold (mean t_i).

    References: Solatorio 2024, arXiv 2402.16829; sentence-transformers GISTEmbedLoss.
    """
    if margin_strategy not in ("absolute", "relative"):
        raise ValueError(f"margin_strategy must be 'absolute' or 'relative', got {margin_strategy!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (negative is None) != (guide_negative is None):
        raise ValueError("negative and guide_negative must both be given or both be None")
    if (anchor_candidates is None) != (guide_anchor_candidates is None):
        raise ValueError("anchor_candidates and guide_anchor_candidates must both be given or both be None")
    _check_shapes(anchor, positive, target_offset)
    B = anchor.size(0)
    layout = dict(contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, target_offset=target_offset)
    negative, guide_negative = _as_candidates(negative), _as_candidates(guide_negative)

    sim, spans = _blocks(anchor, positive, negative, anchor_candidates=anchor_candidates, **layout)  # (B, C)
    with torch.no_grad():
        if veto is None:
            veto = guide_mask(
                guide_anchor,
                guide_positive,
                guide_negative,
                guide_anchor_candidates=guide_anchor_candidates,
                margin_strategy=margin_strategy,
                margin=margin,
                **layout,
            )
        mask = veto.mask.clone()  # a shared veto stays as it was
        if mask_self_pairs:
            mask |= _self_pair_mask(spans, B, sim.size(1), target_offset, sim.device)
        if text_ids is not None:
            mask |= _text_identity_mask(text_ids, spans, B, target_offset)
    loss, stats = _infonce(sim, mask, temperature=temperature, target_offset=target_offset)
    stats["guide_threshold"] = veto.threshold.mean()
    return loss, stats


def no_guide_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor | None = None,
    *,
    temperature: float = 0.01,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    text_ids: tuple[Tensor, Tensor, Tensor | None] | None = None,
    target_offset: int = 0,
    anchor_candidates: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GIST 4-block InfoNCE without a guide: only each row's own anchor (aa) and positive (pp) are
    masked. The ablation that isolates what the guide's vetoes add. Args as in `gist_loss`."""
    _check_shapes(anchor, positive, target_offset)
    B = anchor.size(0)
    sim, spans = _blocks(
        anchor,
        positive,
        _as_candidates(negative),
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
        target_offset=target_offset,
        anchor_candidates=anchor_candidates,
    )
    mask = _self_pair_mask(spans, B, sim.size(1), target_offset, sim.device)
    if text_ids is not None:
        mask |= _text_identity_mask(text_ids, spans, B, target_offset)
    return _infonce(sim, mask, temperature=temperature, target_offset=target_offset)


def mnrl_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor | None = None,
    *,
    temperature: float = 0.05,
    text_ids: tuple[Tensor, Tensor, Tensor | None] | None = None,
    target_offset: int = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MultipleNegativesRankingLoss: InfoNCE of anchor i over all positives and hard negatives
    ([ap | an] blocks). temperature 0.05 equals sentence-transformers' default scale 20."""
    _check_shapes(anchor, positive, target_offset)
    sim, spans = _blocks(
        anchor,
        positive,
        _as_candidates(negative),
        contrast_anchors=False,
        contrast_positives=False,
        target_offset=target_offset,
    )
    mask = torch.zeros_like(sim, dtype=torch.bool)
    if text_ids is not None:
        mask |= _text_identity_mask(text_ids, spans, anchor.size(0), target_offset)
    return _infonce(sim, mask, temperature=temperature, target_offset=target_offset)


def matryoshka_loss(
    loss_fn, embeddings: dict[str, Tensor], dims: list[int], weights: list[float] | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Matryoshka representation learning (Kusupati et al. 2022) around any loss above: sum over `dims`
    of weight x `loss_fn` on the student embeddings truncated to their first `dim` coordinates (every
    loss here compares cosines, so the truncated vectors are re-normalised inside it). Weights default
    to 1 (sentence-transformers' MatryoshkaLoss), so `dims=[full dim]` is the plain loss.

    loss_fn: embeddings dict -> (loss, stats), e.g. a `functools.partial` of `gist_loss` with the guide's
    veto computed once (`guide_mask`). Returns the weighted sum and the first dimension's stats plus
    `loss_dim<d>` per dimension."""
    weights = list(weights) if weights is not None else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka weights ({len(weights)}) and dims ({len(dims)}) differ in length")
    width = next(iter(embeddings.values())).size(-1)
    if any(not 0 < d <= width for d in dims):
        raise ValueError(f"matryoshka dims must lie in [1, {width}] (the embedding width), got {list(dims)}")
    total, stats = None, {}
    for dim, weight in zip(dims, weights):
        loss, dim_stats = loss_fn({k: v[..., :dim] for k, v in embeddings.items()})
        total = weight * loss if total is None else total + weight * loss
        stats = stats or dim_stats
        stats[f"loss_dim{dim}"] = loss.detach()
    return total, stats

"""All cross-process arithmetic of training in one place: gathering loss candidates across DDP ranks
with correct gradients, the manual gradient all-reduce GradCache needs under DDP, and rank-agreement
checks (so a fault on one rank stops every rank instead of leaving the others blocked in a collective).

Every function is a no-op (returns its input) when torch.distributed is not initialized or the world
has one process, so single-process code paths call them unconditionally.

Gathering candidates (`loss.gather_across_devices=true`), per optimizer step with W ranks of B rows:

    rank r's loss L_r = mean over ITS B anchors of InfoNCE over ALL ranks' candidates
    (positives, hard negatives, and anchors for the aa block); target column = offset_r + i,
    offset_r = B_0 + ... + B_{r-1} (= r * B for equal batches).

Gradient routing. The single-process reference is L = mean over all W*B anchors = (1/W) sum_r L_r
(equal B). DDP averages parameter gradients over ranks: it computes (1/W) sum_r dG_r/dtheta, where
G_r is whatever rank r backpropagates through its OWN encoder forward. For the sum to equal dL/dtheta,
the gradient reaching rank r's embeddings e_r must be sum_s dL_s/de_r: the contributions of every
rank's loss, not only its own. `gather_rows` therefore is an autograd Function whose backward
all-reduces (sums) the incoming gradient over ranks and returns this rank's rows of it.

The cheaper "local slice keeps its graph, other ranks' rows detached" gather (no backward
collective) is NOT used: with anchors kept local, rank s's loss depends on rank r's positives only
through a detached copy on rank s, so the terms dL_s/de_r (s != r) are lost and the gradient is wrong
(it is right only when every rank computes the FULL global loss and the result is scaled by W, which
costs W times the loss work and breaks the "anchors stay local" layout). The all-reduce in backward
moves (W*rows x d) floats once per step; tests/test_distributed.py checks loss, embedding gradients
and DDP-averaged parameter gradients against the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_padded(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """Every rank's `x` (leading sizes `sizes`, other dims equal), via one padded all_gather."""
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.size(0)] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return [t[:n] for t, n in zip(out, sizes)]


class _GatherRows(torch.autograd.Function):
    """Forward: concatenation of every rank's rows. Backward: the sum over ranks of the gradient
    w.r.t. the concatenation, restricted to this rank's rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat(_all_gather_padded(x.detach(), sizes))

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's `n` (one tiny all_gather)."""
    rank, world = rank_and_world()
    if world == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def gather_rows(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate `x` (n_r, ...) of all ranks in rank order: (sum_r n_r, ...). Ranks may hold
    different numbers of rows (`sizes`, gathered when not given). Differentiable when `x` requires
    grad: the backward all-reduces, so EVERY rank must backpropagate through its result."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.size(0), x.device)
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, sizes, rank)
    return torch.cat(_all_gather_padded(x.detach(), sizes))


_BLOCKS = ("anchor", "positive", "negative")


def gather_for_loss(
    student: dict[str, Tensor],
    guide: dict[str, Tensor] | None,
    text_ids: tuple[Tensor, Tensor, Tensor | None],
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, tuple[Tensor, Tensor, Tensor | None], int]:
    """The inputs of a loss wrapper (gist.core.losses), with candidates gathered from every rank.

    Args: this rank's student embeddings {anchor (B, d), positive (B, d), negative (B, k, d) | (B, d) |
    absent}, the guide's embeddings of the same texts (or None) and text ids (anchor, positive,
    negative|None). Returns (student, guide, text_ids, target_offset) where `anchor` stays LOCAL,
    `positive` / `negative` are every rank's, `anchor_candidates` holds every rank's anchors (for the
    aa block), text ids are every rank's (anchor, positive, negative) and target_offset is the number
    of positives on lower ranks. Ranks may differ in batch size and in having hard negatives (a rank
    without them contributes none). Four collectives: sizes, student rows (differentiable), guide rows,
    text ids. Outside DDP the inputs come back unchanged with offset 0.
    """
    rank, world = rank_and_world()
    if world == 1:
        return student, guide, text_ids, 0
    anchor = student["anchor"]
    B = anchor.size(0)

    def flat(block: dict[str, Tensor] | None, name: str, like: Tensor) -> Tensor:
        t = block.get(name) if block is not None else None
        if t is None:
            return like.new_zeros((0, like.size(-1)))
        return t.reshape(-1, t.size(-1))

    neg = flat(student, "negative", anchor)
    counts = torch.tensor([B, student["positive"].size(0), neg.size(0)], dtype=torch.long, device=anchor.device)
    per_rank = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(per_rank, counts)
    per_rank = [[int(v) for v in c.tolist()] for c in per_rank]
    if any(a != p for a, p, _ in per_rank):
        raise ValueError(f"every rank needs as many positives as anchors to gather candidates, got {per_rank}")
    rows = [sum(c) for c in per_rank]

    def split(gathered: Tensor) -> dict[str, Tensor]:
        parts: dict[str, list[Tensor]] = {k: [] for k in _BLOCKS}
        for chunk, c in zip(gathered.split(rows), per_rank):
            for name, part in zip(_BLOCKS, chunk.split(c)):
                parts[name].append(part)
        return {k: torch.cat(v) for k, v in parts.items()}

    s = split(gather_rows(torch.cat([anchor, student["positive"], neg]), rows))
    any_negatives = any(c[2] for c in per_rank)
    out_student = {"anchor": anchor, "positive": s["positive"], "anchor_candidates": s["anchor"]}
    if any_negatives:
        out_student["negative"] = s["negative"]

    out_guide = None
    if guide is not None:
        g_anchor = guide["anchor"]
        with torch.no_grad():
            g = split(
                gather_rows(torch.cat([g_anchor, guide["positive"], flat(guide, "negative", g_anchor)]).detach(), rows)
            )
        out_guide = {"anchor": g_anchor, "positive": g["positive"], "anchor_candidates": g["anchor"]}
        if any_negatives:
            out_guide["negative"] = g["negative"]

    a_ids, p_ids, n_ids = text_ids
    n_ids = n_ids.reshape(-1) if n_ids is not None else a_ids.new_zeros(0)
    ids = split(gather_rows(torch.cat([a_ids.reshape(-1), p_ids.reshape(-1), n_ids]).unsqueeze(1), rows).squeeze(1))
    out_ids = (ids["anchor"], ids["positive"], ids["negative"] if any_negatives else None)
    offset = sum(c[1] for c in per_rank[:rank])
    return out_student, out_guide, out_ids, offset


def all_ranks_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True iff `flag` holds on every rank (one all_reduce MIN): ranks agree before raising."""
    rank, world = rank_and_world()
    if world == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def average_gradients(params) -> None:
    """Average `.grad` over ranks in place, as DDP's reducer does (one flat all_reduce per dtype and
    device). Parameters without a gradient are left alone; which ones have one must agree across ranks
    (it does: every rank runs the same encoder code)."""
    rank, world = rank_and_world()
    if world == 1:
        return
    groups: dict[tuple, list] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def suspend_ddp_sync(ddp_module) -> bool:
    """Called inside a DDP forward (a Lightning training_step): keep DDP from arming its gradient hooks
    for this step, so several backward passes (GradCache's replay) accumulate local gradients, as under
    `DDP.no_sync()`. Returns whether DDP WOULD have synchronized this step (False under `no_sync`, e.g.
    Lightning's gradient accumulation): then the caller runs `average_gradients` once after its last
    backward, and `resume_ddp_sync`. This works because DDP reads `require_backward_grad_sync` in its
    post-forward, after the wrapped training_step has returned (torch.nn.parallel.DistributedDataParallel).
    The cost: the gradient all-reduce no longer overlaps the last mini-batch's backward."""
    if ddp_module is None:
        return False
    sync = bool(ddp_module.require_backward_grad_sync)
    ddp_module.require_backward_grad_sync = False
    return sync


def resume_ddp_sync(ddp_module, sync: bool) -> None:
    """Undo `suspend_ddp_sync` (after the step's backward)."""
    if ddp_module is not None:
        ddp_module.require_backward_grad_sync = sync

"""GradCache (Gao et al. 2021) for any loss over embeddings: large batches at the memory of a mini-batch.

1. Embed every block of the batch in mini-batches WITHOUT a graph, remembering each mini-batch's RNG
   state (so dropout can be replayed exactly).
2. Compute the (unchanged, pure) loss on those embeddings as leaves; backprop to get dL/d(embedding).
3. When the returned loss is backpropagated, re-run each mini-batch WITH a graph under its saved RNG
   state and backprop `<embedding, dL/d(embedding)>`: the parameter gradients equal the plain ones.

Peak activation memory is one mini-batch's; the loss itself sees the whole batch, so in-batch
negatives (and the guide's vetoes) are exactly those of the large batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from gist.core.bucketing import padding_side, trim


class RngState:
    """The CPU and CUDA RNG states at one moment, to re-run a forward pass with identical dropout."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )

    @contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _chunks(features: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    """Mini-batches of a tokenized block, each trimmed to its longest text (on the padding side)."""
    n, side = features["attention_mask"].size(0), padding_side(features["attention_mask"])
    return [trim({k: v[i : i + size] for k, v in features.items()}, side) for i in range(0, n, size)]


def embed_without_graph(
    encoder: nn.Module, features: dict[str, Tensor], mini_batch_size: int
) -> tuple[Tensor, list[RngState]]:
    """(B, d) embeddings of one block, computed mini-batch by mini-batch with no autograd graph."""
    outs, states = [], []
    for chunk in _chunks(features, mini_batch_size):
        states.append(RngState())
        with torch.no_grad():
            outs.append(encoder(chunk))
    return torch.cat(outs), states


def replay_backward(
    encoder: nn.Module, features: dict[str, Tensor], states: list[RngState], grad: Tensor, mini_batch_size: int
) -> None:
    """Accumulate parameter gradients of `sum(embedding * grad)`, one mini-batch graph at a time."""
    for chunk, state, g in zip(_chunks(features, mini_batch_size), states, grad.split(mini_batch_size)):
        with state.replay(), torch.enable_grad():  # hooks run with grad mode off
            emb = encoder(chunk)
            surrogate = (emb * g.to(emb.dtype)).sum()
        surrogate.backward()


def cached_loss(
    encoder: nn.Module,
    features: dict[str, dict[str, Tensor]],
    loss_fn: Callable[[dict[str, Tensor]], tuple[Tensor, dict]],
    mini_batch_size: int,
    after_replay: Callable[[], None] | None = None,
) -> tuple[Tensor, dict]:
    """GradCache step. `features`: block -> tokenized inputs; `loss_fn(embeddings) -> (loss, stats)`.

    Returns a scalar whose `.backward()` fills the encoder's parameter gradients exactly as the plain
    `loss_fn({block: encoder(features[block])})` would (up to float summation order).

    `after_replay` runs once the last mini-batch's backward is done. Under DDP each replayed mini-batch
    is a separate backward, which DDP's hooks must not all-reduce one by one: the caller suspends DDP's
    sync for the step and averages the gradients itself in `after_replay` (gist.infra.distributed), which is
    what `no_sync` for all mini-batches but the last would give. `loss_fn` may gather embeddings
    across ranks (gist.infra.distributed.gather_for_loss): its backward collective runs in this function."""
    embedded = {block: embed_without_graph(encoder, f, mini_batch_size) for block, f in features.items()}
    leaves = {block: emb.detach().requires_grad_() for block, (emb, _) in embedded.items()}
    with torch.enable_grad():
        loss, stats = loss_fn(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    grads = dict(zip(leaves, grads))

    def replay(grad_output: Tensor) -> None:
        # grad_output carries any loss scaling (AMP) or accumulation factor applied by the caller.
        for block, (_, states) in embedded.items():
            replay_backward(encoder, features[block], states, grads[block] * grad_output, mini_batch_size)
        if after_replay is not None:
            after_replay()

    out = loss.detach().requires_grad_()
    out.register_hook(replay)
    return out, stats

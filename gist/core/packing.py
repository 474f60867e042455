"""Padding-free encoding: the texts of a step in packed rows of real tokens (`pack_blocks`; at most
ROW_TOKENS a row), attention kept within each text.

The linear layers (most of an encoder's FLOPs) then see only real tokens, in one GEMM per layer and row;
attention runs per text: through FlashAttention's variable-length kernel on CUDA
(`torch.nn.attention.varlen.varlen_attn`) when it applies, else SDPA over the texts gathered back into a
padded layout (texts x longest, in length-sorted groups as length buckets make them) with a key-padding
mask, which gives the same result as the padded forward.

    layout = PackedLayout.of([5, 3, 7], device)          # three texts of 5, 3 and 7 tokens
    enable_packing(hf_model)                             # once: its attention honours layouts
    hidden = hf_model(input_ids=ids, position_ids=layout.position_ids, gist_packing=layout).last_hidden_state
    per_text = layout.view.pad(hidden[0])                # (3, 7, d), padding where layout.view.valid is False

The packed attention is registered in transformers' attention interface (one entry per base kernel, e.g.
"gist_packed_sdpa"). A forward without a layout (evaluation, mining: padded batches) is passed to the base
kernel unchanged, with the base kernel's masks. Models whose attention does not go through that interface
(`_supports_attention_backend`, e.g. MPNet) cannot pack: `enable_packing` says so.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREFIX = "gist_packed_"


@dataclass(frozen=True)
class PaddedView:
    """Some texts of a packed row gathered into a right-padded (n, L) layout, L their longest."""

    index: Tensor  # (n * L,): packed position of each slot (0 for padding)
    valid: Tensor  # (n, L) bool: real tokens
    slots: Tensor  # (tokens,): the slots holding real tokens, text by text

    @classmethod
    def of(cls, starts: list[int], lengths: list[int]) -> PaddedView:
        lens = torch.tensor(lengths)
        valid = torch.arange(max(lengths))[None, :] < lens[:, None]
        index = (torch.tensor(starts)[:, None] + torch.arange(max(lengths))[None, :]).masked_fill(~valid, 0)
        return cls(index.flatten(), valid, valid.flatten().nonzero().squeeze(1))

    def to(self, device) -> PaddedView:
        return PaddedView(*(t.to(device, non_blocking=True) for t in (self.index, self.valid, self.slots)))

    def pad(self, packed: Tensor, dim: int = 0) -> Tensor:
        """(..., T, ...) packed along `dim` -> (..., n, L, ...), right-padded (the padding repeats the row's
        first token: mask it with `valid`)."""
        return packed.index_select(dim, self.index).unflatten(dim, self.valid.shape)

    def unpad(self, padded: Tensor) -> Tensor:
        """(n, L, ...) -> (tokens, ...): the real tokens, text by text (inverse of `pad` along dim 0)."""
        return padded.flatten(0, 1).index_select(0, self.slots)


@dataclass(frozen=True)
class PackedLayout:
    """Where each text of a packed row lies. Built on the host from its lengths, moved once to `device`.

    `view` pads all texts in packed order (pooling); `groups` pad length-sorted groups of texts for the
    attention on the CPU path (bucket_size texts / bucket_tokens padded tokens each, as length buckets do:
    less padded attention), and `restore` puts their tokens back in packed order."""

    lengths: tuple[int, ...]  # tokens per text, in packed order
    position_ids: Tensor  # (1, T): 0..L_i-1 for each text, as if it were alone
    view: PaddedView
    groups: tuple[PaddedView, ...]
    restore: Tensor | None  # (T,): where each packed token is among the groups' tokens; None = same order
    cu_seqlens: Tensor  # (N + 1,) int32: start of each text in the packed row, then T

    @classmethod
    def of(
        cls,
        lengths: list[int],
        device: torch.device | str | None = None,
        bucket_size: int | None = None,
        bucket_tokens: int | None = None,
    ) -> PackedLayout:
        from gist.core.bucketing import bucket_bounds

        if not lengths or min(lengths) < 1:
            raise ValueError(f"every packed text needs at least one token, got lengths {lengths}")
        starts = [0, *itertools.accumulate(lengths)]
        view = PaddedView.of(starts[:-1], lengths)
        groups, restore = [view], None  # no buckets: the attention over all texts at once
        if bucket_size or bucket_tokens:
            order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # longest first, stable
            groups, first = [], 0
            for size in bucket_bounds([lengths[i] for i in order], bucket_size or None, bucket_tokens or None):
                members = order[first : first + size]
                groups.append(PaddedView.of([starts[i] for i in members], [lengths[i] for i in members]))
                first += size
            grouped = torch.cat([g.index[g.slots] for g in groups])  # packed position of each grouped token
            restore = torch.argsort(grouped)
        position_ids = torch.cat([torch.arange(k) for k in lengths])[None, :]
        return cls(
            tuple(lengths),
            position_ids.to(device, non_blocking=True),
            view.to(device),
            tuple(g.to(device) for g in groups),
            restore.to(device, non_blocking=True) if restore is not None else None,
            torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True),
        )

    @property
    def max_length(self) -> int:
        return max(self.lengths)


def packed_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    gist_packing: PackedLayout | None = None,
    base: str = "sdpa",
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: q (1, H, T, dh), k/v (1, Hkv, T, dh) -> (1, T, H, dh).
    Without a layout, the base kernel does the work (a padded batch, its own mask)."""
    if gist_packing is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[base](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if query.size(0) != 1:
        raise ValueError(f"a packed forward holds one row, got a batch of {query.size(0)}")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("packed attention does not support sliding-window layers; set model.packing=false")
    layout = gist_packing
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    gqa = key.size(1) != query.size(1)
    if _use_varlen(query, dropout):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, dh)
        cu, longest = layout.cu_seqlens, layout.max_length
        window = (-1, 0) if causal else (-1, -1)
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=window, enable_gqa=gqa)
        return out.unsqueeze(0), None
    # Each group of texts gathered into (n, heads, L, dh), keys past each text's end masked out: the padded
    # forward's attention, on the packed row's projections; then the tokens back in packed order.
    outs = []
    for group in layout.groups:
        q, k, v = (group.pad(x[0], dim=1).transpose(0, 1) for x in (query, key, value))
        mask = group.valid[:, None, None, :]
        if causal:
            n = group.valid.size(1)
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        outs.append(group.unpad(out.transpose(1, 2)))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if layout.restore is not None:
        out = out.index_select(0, layout.restore)
    return out.unsqueeze(0), None


def _use_varlen(query: Tensor, dropout: float) -> bool:
    """FlashAttention's variable-length kernel: CUDA, half precision, no attention dropout (it has none)."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0


def packed_mask(*args, base_mask=None, attention_mask: Tensor | None = None, **kwargs):
    """The mask function registered beside the packed attention: a packed forward (no 2D mask) needs none,
    its layout says where texts end; a padded batch gets the base kernel's own mask."""
    if attention_mask is None:
        return None
    return base_mask(*args, attention_mask=attention_mask, **kwargs)


def _register_packed_kernels() -> None:
    """Register "gist_packed_<base>" beside every base kernel transformers registers with its masks. Done at
    import, so any process that unpickles a packing model (DDP's spawned workers) knows the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in list(ALL_ATTENTION_FUNCTIONS.valid_keys()):
        if base.startswith(PREFIX) or base not in ALL_MASK_ATTENTION_FUNCTIONS:
            continue
        ALL_ATTENTION_FUNCTIONS.register(PREFIX + base, functools.partial(packed_attention, base=base))
        mask = functools.partial(packed_mask, base_mask=ALL_MASK_ATTENTION_FUNCTIONS[base])
        ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX + base, mask)


_register_packed_kernels()


def enable_packing(model: nn.Module) -> str:
    """Route `model`'s attention through the packed attention (its current kernel handles unpacked batches);
    returns the kernel's name. Raises when the model's attention does not use transformers' interface."""
    base = model.config._attn_implementation
    if base.startswith(PREFIX):
        return base
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so it "
            "cannot pack texts: set model.packing=false (length buckets: bucket_size / bucket_tokens)"
        )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if PREFIX + base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"packing keeps the model's attention kernel for padded batches, and {base!r} is not one transformers "
            "registers with its masks: use model.attn_implementation=sdpa (or flash_attention_2 on CUDA)"
        )
    model.set_attn_implementation(PREFIX + base)
    return PREFIX + base


ROW_TOKENS = 2048


def row_bounds(lengths: list[int], row_tokens: int | None) -> list[tuple[int, int]]:
    """(first text, number of texts) of consecutive packed rows of at most `row_tokens` tokens each (a
    longer text gets a row of its own); None = one row."""
    rows, first, used = [], 0, 0
    for i, n in enumerate(lengths):
        if row_tokens is not None and i > first and used + n > row_tokens:
            rows.append((first, i - first))
            first, used = i, 0
        used += n
    return [*rows, (first, len(lengths) - first)]


def pack_blocks(
    blocks: dict[str, dict[str, Tensor]],
    bucket_size: int | None = None,
    bucket_tokens: int | None = None,
    row_tokens: int | None = ROW_TOKENS,
) -> list[dict]:
    """Tokenized blocks (any padding side, each its own width) -> packed rows: the real tokens of every
    text, block after block, at most `row_tokens` tokens a row (None: one row), each with its layout under
    "packing" (and per-text prompt lengths, when given). The host reads each block's mask once; the
    gathers run on the blocks' device. `bucket_size` / `bucket_tokens`: the attention's length groups
    (PackedLayout); None = all texts of a row in one group.

    Rows are capped because glibc cannot reuse the freed blocks of a step's large temporaries (one
    [tokens x 1536] tensor per layer): a single row for 512 texts (11,500 tokens) left 7.7 GB resident
    after the forward for 2.2 GB of saved activations; rows of <= 3,000 tokens, 2.6-2.8 GB."""
    host_masks = [f["attention_mask"].cpu() for f in blocks.values()]
    first = next(iter(blocks.values()))
    device = first["attention_mask"].device
    offsets = itertools.accumulate((m.numel() for m in host_masks[:-1]), initial=0)
    source = torch.cat([m.flatten().nonzero().squeeze(1) + at for m, at in zip(host_masks, offsets)])
    flat = {
        k: torch.cat([f[k].flatten() for f in blocks.values()]) for k in ("input_ids", "token_type_ids") if k in first
    }
    prompt_length = torch.cat([f["prompt_length"] for f in blocks.values()]) if "prompt_length" in first else None
    lengths = torch.cat([m.sum(1) for m in host_masks]).tolist()
    token_starts = [0, *itertools.accumulate(lengths)]
    rows = []
    for text, n in row_bounds(lengths, row_tokens):
        src = source[token_starts[text] : token_starts[text + n]].to(device, non_blocking=True)
        row = {k: v.index_select(0, src)[None] for k, v in flat.items()}
        if prompt_length is not None:
            row["prompt_length"] = prompt_length[text : text + n]
        row["packing"] = PackedLayout.of(lengths[text : text + n], device, bucket_size, bucket_tokens)
        rows.append(row)
    return rows

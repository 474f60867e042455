"""Length-bucketed encoding of a step's texts (all blocks at once) and the padding helpers it rests on.

out = encode_blocks(student, {"anchor": feats_a, "positive": feats_p}, bucket_size=8)  # {block: (B, d)}
out = encode_blocks(student, blocks, bucket_size=None, bucket_tokens=512)  # buckets by a token budget
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gist.core.packing import pack_blocks


def padding_side(attention_mask: Tensor) -> str | None:
    """ "right" when every row is ones then zeros, "left" when zeros then ones (a batch without padding
    is "right"), None otherwise."""
    if is_right_padded(attention_mask):
        return "right"
    return "left" if is_right_padded(attention_mask.flip(1)) else None


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is ones then zeros, so trimming columns past a row's length loses nothing."""
    lengths = attention_mask.sum(1, keepdim=True)
    positions = torch.arange(1, attention_mask.size(1) + 1, device=attention_mask.device)
    return bool((attention_mask.cumsum(1) == torch.minimum(positions, lengths)).all())


def trim(features: dict[str, Tensor], side: str | None, longest: int | None = None) -> dict[str, Tensor]:
    """Drop the columns that are padding in every row (on `side`; None = keep all). `longest`: the longest
    row's length when the caller knows it (no read of the mask by the host)."""
    if side is None:
        return features
    if longest is None:
        longest = int(features["attention_mask"].sum(1).max())
    cut = slice(None, longest) if side == "right" else slice(features["attention_mask"].size(1) - longest, None)
    return {k: v[:, cut] if v.dim() >= 2 else v for k, v in features.items()}


def _pad_to(x: Tensor, width: int, side: str, value: int) -> Tensor:
    """A (B, L) token tensor padded to `width` columns on `side`; per-text values (B,) pass unchanged."""
    if x.dim() < 2 or x.size(1) == width:
        return x
    extra = width - x.size(1)
    return F.pad(x, (0, extra) if side == "right" else (extra, 0), value=value)


def bucket_bounds(lengths: list[int], bucket_size: int | None, bucket_tokens: int | None) -> list[int]:
    """Sizes of consecutive buckets over texts sorted longest first: each bucket holds at most
    `bucket_size` texts and at most `bucket_tokens` padded tokens (texts x its first, longest, text), and
    at least one text. None = no limit of that kind."""
    sizes, start, n = [], 0, len(lengths)
    while start < n:
        size = n - start if bucket_size is None else min(bucket_size, n - start)
        if bucket_tokens is not None:
            size = max(1, min(size, bucket_tokens // max(1, lengths[start])))
        sizes.append(size)
        start += size
    return sizes


def encode_blocks(
    encoder: nn.Module,
    blocks: dict[str, dict[str, Tensor]],
    bucket_size: int | None = None,
    bucket_tokens: int | None = None,
) -> dict[str, Tensor]:
    """Embed several tokenized blocks (anchor / positive / negative) -> {block: (B, d)}.

    bucket_size and bucket_tokens None: one forward per block, padded to the block's longest text.
    Otherwise the texts of ALL blocks are sorted by length and embedded in buckets of at most
    `bucket_size` texts and at most `bucket_tokens` padded tokens (a token budget: many short texts or
    few long ones, for GEMMs of a steady size), each bucket trimmed to its own longest text on the
    tokenizer's padding side (right for BERT and MPNet, left for most decoders; the pad id is the
    tokenizer's): the same embeddings (padded keys get zero attention weight; they differ only by float
    summation order, and under left padding by the rotary positions' common shift) and gradients, for
    fewer padded tokens. Blocks padded on different sides fall back to one forward each.
    An encoder built with packing=True embeds the texts in padding-free packed rows instead (one forward
    per row of <= its packed_row_tokens); the buckets then group its attention only (gist.core.packing).
    """
    if getattr(encoder, "packing", False):  # padding-free rows; buckets group the attention only
        rows = pack_blocks(blocks, bucket_size, bucket_tokens, encoder.packed_row_tokens)
        out = torch.cat([encoder(row) for row in rows])
        return dict(zip(blocks, out.split([f["attention_mask"].size(0) for f in blocks.values()])))
    if not bucket_size and not bucket_tokens:
        return {block: encoder(features) for block, features in blocks.items()}
    # The host reads the masks once (one transfer per block on a GPU): sides, lengths and bucket widths are
    # decided from this copy, so the step's forwards queue up without waiting on the device.
    host_masks = [f["attention_mask"].cpu() for f in blocks.values()]
    sides = {padding_side(m) for m in host_masks}
    if len(sides) != 1 or None in sides:
        return {block: encoder(features) for block, features in blocks.items()}
    side = sides.pop()
    first = next(iter(blocks.values()))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "prompt_length") if k in first]
    tokenizer = getattr(encoder, "tokenizer", None)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    width = max(f["attention_mask"].size(1) for f in blocks.values())
    padded = {
        k: torch.cat([_pad_to(f[k], width, side, pad_id if k == "input_ids" else 0) for f in blocks.values()])
        for k in keys
    }
    lengths = torch.cat([m.sum(1) for m in host_masks])  # on the host
    # Only an Encoder (not the frozen guide) owns its `model`: the guide needs no gradient, hence no lookup.
    model = getattr(encoder, "model", None)
    word_embeddings = model.get_input_embeddings() if model is not None else None
    if torch.is_grad_enabled() and word_embeddings is not None and word_embeddings.weight.requires_grad:
        # Look the tokens up once for the whole step: one backward into the (dense, vocab x d)
        # embedding gradient instead of one per bucket.
        padded["inputs_embeds"] = word_embeddings(padded.pop("input_ids"))
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    sizes = bucket_bounds(sorted_lengths, bucket_size or None, bucket_tokens or None)
    starts = [0, *itertools.accumulate(sizes)][:-1]
    device_order = order.to(padded["attention_mask"].device)
    embs = []
    for start, idx in zip(starts, device_order.split(sizes)):
        bucket = trim({k: v[idx] for k, v in padded.items()}, side, longest=sorted_lengths[start])
        embs.append(encoder({**bucket, "padding_side": side}))
    out = torch.cat(embs)[torch.argsort(device_order)]  # back to block order; gradients flow to every bucket
    sizes = [f["attention_mask"].size(0) for f in blocks.values()]
    return dict(zip(blocks, out.split(sizes)))

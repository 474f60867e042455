"""Sentence pooling as sentence-transformers' `Pooling` module defines each mode, for right or left
padding and with per-text prompt lengths (a length bucket mixes queries and documents, whose prompts
differ; sentence-transformers takes one prompt length per batch). tests/test_embedders.py checks equality
with its module for every mode.

    emb = pool(last_hidden, attention_mask, "lasttoken")          # (B, d)
"""

from __future__ import annotations

import torch
from torch import Tensor

# sentence-transformers' pooling modes (sentence_transformers Pooling.POOLING_MODES).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def check_pooling(pooling) -> str | tuple[str, ...]:
    """A pooling mode (or several, concatenated) as sentence-transformers names them; else ValueError."""
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"unknown pooling mode {pooling!r}: use one of {POOLING_MODES} (or a list of them), or null")
    return modes[0] if len(modes) == 1 else modes


def pool(last_hidden: Tensor, attention_mask: Tensor, mode, prompt_length: Tensor | None = None) -> Tensor:
    """(B, T, d) token states -> (B, d * modes) sentence embeddings, as sentence-transformers' Pooling
    defines each mode, for right or left padding. `prompt_length` (B,): leading tokens of each text that
    are its prompt, left out of the pooling (include_prompt=False); weightedmean keeps the other tokens'
    original position weights."""
    modes = (mode,) if isinstance(mode, str) else mode
    T = last_hidden.size(1)
    positions = torch.arange(T, device=last_hidden.device)
    start = attention_mask.to(torch.int32).argmax(1)  # first real token: > 0 only under left padding
    mask = attention_mask
    if prompt_length is not None:
        mask = mask * (positions[None, :] >= (start + prompt_length.to(start.device))[:, None])
    acc = torch.float32 if last_hidden.dtype in (torch.float16, torch.bfloat16) else last_hidden.dtype
    out = []
    for m in modes:
        if m == "cls":  # the first token that is neither padding nor prompt
            first = mask.to(torch.int32).argmax(1)
            out.append(last_hidden[torch.arange(len(first)), first])
        elif m == "lasttoken":
            values, from_end = mask.flip(1).max(1)
            last = torch.where(values == 0, 0, T - 1 - from_end)
            out.append(last_hidden[torch.arange(len(last)), last] * values[:, None].to(last_hidden.dtype))
        elif m == "max":
            out.append(last_hidden.masked_fill(mask[..., None] == 0, float("-inf")).max(1).values)
        elif m in ("mean", "mean_sqrt_len_tokens"):
            w = mask[..., None].to(last_hidden.dtype)
            total = (last_hidden * w).sum(1, dtype=acc)
            count = w.sum(1, dtype=acc).clamp(min=1e-9)
            out.append((total / (count if m == "mean" else count.sqrt())).to(last_hidden.dtype))
        elif m == "weightedmean":
            weights = (positions[None, :] + 1 - start[:, None]).to(acc) * mask.to(
                acc
            )  # 1, 2, ... from the first real token
            total = (last_hidden * weights[..., None]).sum(1)
            out.append((total / weights.sum(1, keepdim=True).clamp(min=1e-9)).to(last_hidden.dtype))
        else:
            check_pooling(m)
    return out[0] if len(out) == 1 else torch.cat(out, -1)

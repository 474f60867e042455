"""Padding-free packing (model.packing): the layout, equivalence with per-block padded encoding (embeddings
and gradients, fp32 and bf16, encoders and decoders, prompts left out of the pooling), padded batches
unchanged, the CUDA variable-length kernel's wiring, models that cannot pack, export, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gist.core import packing
from gist.core.bucketing import encode_blocks
from gist.core.encoder import Encoder
from gist.core.packing import PackedLayout, pack_blocks, row_bounds
from tests.helpers import DeviceTensor, assert_same_embeddings_and_gradients

pytestmark = pytest.mark.unit

TEXTS = {
    "anchor": ["a b c d e f g h", "x", "the cat sat", "one two three four five six seven eight nine ten"],
    "positive": ["q w", "e r t y u i o", "p", "z z z z"],
    "negative": ["lorem ipsum dolor sit amet consectetur", "k", "m n b v", "c"],
}


def test_layout_of_three_texts_by_hand():
    layout = PackedLayout.of([2, 3, 1])
    assert layout.position_ids.tolist() == [[0, 1, 0, 1, 2, 0]]
    view = layout.view  # all texts in packed order (pooling)
    assert view.valid.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert view.index.tolist() == [0, 1, 0, 2, 3, 4, 5, 0, 0]  # padding slots point at token 0
    assert view.slots.tolist() == [0, 1, 3, 4, 5, 6]
    assert layout.cu_seqlens.tolist() == [0, 2, 5, 6] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_length == 3
    assert layout.groups == (view,) and layout.restore is None  # no buckets: one attention group
    x = torch.arange(6.0)[:, None] * torch.ones(1, 2)
    padded = view.pad(x)
    assert padded.shape == (3, 3, 2) and padded[1, :, 0].tolist() == [2.0, 3.0, 4.0]
    torch.testing.assert_close(view.unpad(padded), x, rtol=0, atol=0)  # a pure gather: bit-exact
    with pytest.raises(ValueError, match="at least one token"):
        PackedLayout.of([2, 0])


def test_attention_groups_by_hand():
    """Buckets of 2 texts over lengths [2, 3, 1]: sorted longest first (texts 1, 0 | 2), each group padded
    to its own longest text; `restore` maps the groups' tokens back to packed order."""
    layout = PackedLayout.of([2, 3, 1], bucket_size=2)
    first, second = layout.groups
    assert first.index.tolist() == [2, 3, 4, 0, 1, 0] and first.valid.tolist() == [[True] * 3, [True, True, False]]
    assert second.index.tolist() == [5] and second.valid.tolist() == [[True]]
    assert layout.restore.tolist() == [3, 4, 0, 1, 2, 5]  # grouped tokens are packed 2, 3, 4, 0, 1, 5
    x = torch.arange(6.0)[:, None]
    grouped = torch.cat([g.unpad(g.pad(x)) for g in layout.groups])
    torch.testing.assert_close(grouped.index_select(0, layout.restore), x, rtol=0, atol=0)
    assert len(PackedLayout.of([2, 3, 1], bucket_tokens=4).groups) == 2  # 4 // 3 = 1 text, then 4 // 2 = 2


def _blocks(enc: Encoder, prompt: str = "") -> dict:
    return {k: dict(enc.tokenize(v, prompt if k == "anchor" else "")) for k, v in TEXTS.items()}


def _run(enc: Encoder, blocks: dict, autocast: bool = False, bucket_size: int | None = None):
    enc.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # A plain encoder without buckets: one padded forward per block; a packing one: one packed forward,
        # its attention in groups of `bucket_size` texts.
        out = encode_blocks(enc, blocks, bucket_size)
    weights = torch.linspace(-1, 1, 12).reshape(3, 4, 1)
    (sum((out[k].float() * w).sum() for k, w in zip(TEXTS, weights))).backward()
    return out, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


CASES = [
    ("tiny_student", {}, ""),  # BERT, mean pooling, absolute positions
    ("tiny_guide", {}, ""),  # BERT, cls pooling
    ("tiny_student", {"include_prompt": False}, "query: the "),  # prompt tokens left out of the pooling
    ("tiny_qwen3", {}, "Instruct: find the text\nQuery: "),  # decoder: causal, GQA, left padding, last token
    ("tiny_llama", {}, ""),  # decoder, weighted mean
]


# Attention over all texts of a row at once, or in length groups of 3; one row, or rows of <= 16 tokens.
@pytest.mark.parametrize(("groups", "row_tokens"), [(None, None), (3, None), (3, 16)])
@pytest.mark.parametrize(("model", "kwargs", "prompt"), CASES)
def test_packed_step_equals_per_block_padded_encoding(request, model, kwargs, prompt, groups, row_tokens):
    path = str(request.getfixturevalue(model))
    plain = Encoder(path, **kwargs).eval()  # dropout off
    packed = Encoder(path, packing=True, packed_row_tokens=row_tokens, **kwargs).eval()
    assert packed.packing and packed.model.config._attn_implementation == "gist_packed_sdpa"
    blocks = _blocks(plain, prompt)
    assert len({f["input_ids"].size(1) for f in blocks.values()}) > 1  # blocks padded to different widths
    if not kwargs.get("include_prompt", True):
        assert blocks["anchor"]["prompt_length"].min() > 0
    ref, ref_grads = _run(plain, blocks)
    got, got_grads = _run(packed, blocks, bucket_size=groups)
    # Same function on the same tokens, other GEMM shapes: the tolerances of length buckets (stated there).
    assert_same_embeddings_and_gradients(ref, got, ref_grads, got_grads)


@pytest.mark.parametrize("model", ["tiny_student", "tiny_qwen3"])
def test_packed_step_under_bf16_autocast_stays_within_bf16_rounding(request, model):
    """bf16 GEMMs of other shapes round differently: per-block and packed embeddings agree to bf16's
    precision (8 bits: relative 2^-8 = 0.0039 per rounding, a few roundings deep), not to fp32's."""
    path = str(request.getfixturevalue(model))
    plain, packed = Encoder(path).eval(), Encoder(path, packing=True).eval()
    blocks = _blocks(plain)
    ref, _ = _run(plain, blocks, autocast=True)
    got, grads = _run(packed, blocks, autocast=True)
    for k in TEXTS:  # unit vectors of 32-48 dims, entries ~0.2: atol 2e-2 is ~5 bf16 ulps at that size
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=0, atol=2e-2)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_a_packing_encoder_embeds_padded_batches_as_before(tiny_qwen3, tiny_student):
    """Evaluation and mining pass padded batches: the packing encoder hands them to the base kernel, masks
    included (left padding on the decoder)."""
    for path in (tiny_student, tiny_qwen3):
        plain, packed = Encoder(str(path)).eval(), Encoder(str(path), packing=True).eval()
        texts = [t for v in TEXTS.values() for t in v]
        torch.testing.assert_close(packed.encode(texts, batch_size=5), plain.encode(texts, batch_size=5))


def test_packing_reads_no_device_values_from_the_host(tiny_student):
    """The layout comes from one host copy of each block's mask: the packed forward queues without waiting
    on a GPU (the bidirectional model builds no mask at all)."""
    enc = Encoder(str(tiny_student), packing=True).eval()
    blocks = {k: {n: t.as_subclass(DeviceTensor) for n, t in enc.tokenize(v).items()} for k, v in TEXTS.items()}
    DeviceTensor.reads = []
    out = encode_blocks(enc, blocks)
    assert out["negative"].shape == (4, enc.dim)
    assert DeviceTensor.reads == []


def test_rows_hold_at_most_their_token_budget():
    assert row_bounds([5, 3, 7, 1, 2], None) == [(0, 5)]
    assert row_bounds([5, 3, 7, 1, 2], 8) == [(0, 2), (2, 2), (4, 1)]  # 5+3 | 7+1 | 2
    assert row_bounds([5, 3, 7, 1, 2], 6) == [(0, 1), (1, 1), (2, 1), (3, 2)]  # a 7-token text: a row of its own
    assert row_bounds([4], 1) == [(0, 1)]


def test_pack_blocks_keeps_every_real_token_in_order(tiny_qwen3):
    enc = Encoder(str(tiny_qwen3))  # left padding, pad id != 0
    blocks = _blocks(enc)
    [packed] = pack_blocks(blocks)  # 12 short texts: one row
    layout = packed["packing"]
    expected = [ids[m.bool()].tolist() for f in blocks.values() for ids, m in zip(f["input_ids"], f["attention_mask"])]
    assert list(layout.lengths) == [len(e) for e in expected]
    assert packed["input_ids"][0].tolist() == [t for e in expected for t in e]
    assert enc.tokenizer.pad_token_id not in packed["input_ids"][0].tolist()
    rows = pack_blocks(blocks, row_tokens=20)  # the same tokens, split into rows of <= 20 tokens
    assert len(rows) > 1 and all(sum(r["packing"].lengths) <= 20 for r in rows)
    assert [t for r in rows for t in r["input_ids"][0].tolist()] == packed["input_ids"][0].tolist()


@pytest.mark.parametrize("model", ["tiny_student", "tiny_qwen3"])  # bidirectional; causal with GQA
def test_cuda_varlen_kernel_gets_the_layout(request, model, monkeypatch):
    """On CUDA (half precision, no attention dropout) the packed attention calls FlashAttention's varlen kernel
    with the layout's cumulative lengths; here a plain per-text reference stands in for the kernel."""
    import torch.nn.attention.varlen as varlen

    calls = []

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        calls.append(window_size)
        out = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qi, ki, vi = (x[a:b].transpose(0, 1) for x in (q, k, v))
            causal = window_size == (-1, 0)
            out.append(
                torch.nn.functional.scaled_dot_product_attention(
                    qi, ki, vi, is_causal=causal, scale=scale, enable_gqa=enable_gqa
                ).transpose(0, 1)
            )
        return torch.cat(out)

    monkeypatch.setattr(varlen, "varlen_attn", reference)
    path = str(request.getfixturevalue(model))
    enc = Encoder(path, packing=True).eval()
    blocks = _blocks(enc)
    ref = encode_blocks(enc, blocks)
    assert not calls  # on this CPU: the padded SDPA path
    monkeypatch.setattr(packing, "_use_varlen", lambda query, dropout: dropout == 0.0)
    got = encode_blocks(enc, blocks)
    assert len(calls) == enc.model.config.num_hidden_layers
    assert set(calls) == {(-1, 0) if model == "tiny_qwen3" else (-1, -1)}
    for k in TEXTS:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_models_that_cannot_pack_say_so(tiny_mpnet, tiny_student):
    with pytest.raises(ValueError, match="AttentionInterface.*model.packing=false"):
        Encoder(str(tiny_mpnet), packing=True)
    with pytest.raises(ValueError, match="attn_implementation=sdpa"):
        Encoder(str(tiny_student), packing=True, attn_implementation="eager")
    plain = Encoder(str(tiny_student))
    with pytest.raises(ValueError, match="packing=True"):
        plain(pack_blocks(_blocks(plain))[0])


def test_the_export_of_a_packing_encoder_loads_anywhere(tmp_path, tiny_student):
    """The packed attention is a runtime choice: the saved config names no gist kernel, and a plain
    SentenceTransformer (no gist import needed) embeds as the encoder does."""
    from sentence_transformers import SentenceTransformer

    from gist.core.export import export_sentence_transformer

    enc = Encoder(str(tiny_student), packing=True).eval()
    path = export_sentence_transformer(enc, tmp_path / "model")
    assert "gist" not in json.dumps(json.loads((Path(path) / "config.json").read_text()))
    texts = TEXTS["anchor"]
    got = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(got, enc.encode(texts), rtol=1e-5, atol=1e-6)


def test_training_with_packing(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    from gist.train import train
    from tests.helpers import assert_metric, tiny_cfg

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr", "model.packing=true"])
    assert_metric(train(cfg))

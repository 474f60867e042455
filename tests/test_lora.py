"""LoRA through peft (`model.lora`): only the adapters train and go into checkpoints, GradCache and
gradient checkpointing give the plain gradients, and the export holds merged weights that plain
`SentenceTransformer(path)` loads (the adapter optionally beside them)."""

from __future__ import annotations

import pytest
import torch

from gist.core.bucketing import encode_blocks
from gist.core.encoder import Encoder
from gist.core.loss_modules import MNRLLoss
from gist.core.module import GISTModule

pytestmark = pytest.mark.unit

LORA = {"r": 4, "alpha": 8}
TEXTS = {
    "anchor": ["the cat sat", "a dog runs very fast", "i love pizza", "bank card money"],
    "positive": ["cat on a mat", "dog walks", "pizza with cheese and more cheese", "my account"],
}


def _lora_encoder(path, seed: int = 0, **kwargs) -> Encoder:
    torch.manual_seed(seed)
    enc = Encoder(str(path), lora=LORA, **kwargs)
    with torch.no_grad():  # peft starts B at zero (the adapter a no-op): give it weight so it matters
        for name, p in enc.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return enc


def test_only_the_adapters_train(tiny_qwen3):
    enc = _lora_encoder(tiny_qwen3)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for n, p in enc.named_parameters() if p.requires_grad) < 0.2 * sum(
        p.numel() for p in enc.parameters()
    )
    with pytest.raises(ValueError, match="unknown keys"):
        Encoder(str(tiny_qwen3), lora={"rank": 4})


def test_checkpoints_hold_the_adapters_only_and_load_back(tiny_qwen3):
    module = GISTModule(_lora_encoder(tiny_qwen3), MNRLLoss())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = [k for k in checkpoint["state_dict"] if k.startswith("student.")]
    assert keys and all("lora_" in k for k in keys)
    assert checkpoint["gist_student"]["lora"] == LORA

    other = GISTModule(_lora_encoder(tiny_qwen3, seed=1), MNRLLoss())
    other.load_state_dict(checkpoint["state_dict"])
    for k in keys:
        torch.testing.assert_close(other.state_dict()[k], checkpoint["state_dict"][k], rtol=0, atol=0)
    broken = dict(checkpoint["state_dict"])
    del broken[keys[0]]
    with pytest.raises(RuntimeError, match="missing"):
        other.load_state_dict(broken)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_gradcache_and_checkpointing_give_the_plain_adapter_gradients(tiny_qwen3, gradient_checkpointing):
    def grads(mini_batch_size, checkpointing):
        enc = _lora_encoder(tiny_qwen3, gradient_checkpointing=checkpointing).eval()
        features = {b: enc.inputs(v, "query" if b == "anchor" else "document")[1] for b, v in TEXTS.items()}
        loss, _ = MNRLLoss(mini_batch_size=mini_batch_size).batch_loss(
            enc, features, None, (torch.arange(4), torch.arange(4, 8), None), encode=lambda e, f: encode_blocks(e, f, 3)
        )
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in enc.named_parameters() if p.requires_grad}

    ref_loss, ref = grads(None, False)
    got_loss, got = grads(2, gradient_checkpointing)
    assert ref and all(g is not None for g in got.values())
    torch.testing.assert_close(got_loss, ref_loss, rtol=0, atol=1e-4)
    scale = max(g.abs().max().item() for g in ref.values())
    for n in ref:  # GradCache's tolerance (tests/test_gradcache.py)
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-4 * scale + 1e-5, msg=n)


def test_export_merges_the_adapters_and_can_keep_them_beside(tiny_qwen3, tmp_path):
    from sentence_transformers import SentenceTransformer

    from gist.core.export import export_sentence_transformer

    enc = _lora_encoder(tiny_qwen3).eval()
    base = Encoder(str(tiny_qwen3)).eval()
    texts = TEXTS["anchor"]
    assert (enc.encode(texts) - base.encode(texts)).abs().max() > 1e-3  # the adapter changes the embeddings
    path = export_sentence_transformer(enc, tmp_path / "model", save_adapter=True)
    assert (path / "adapter" / "adapter_config.json").is_file()
    assert not any("lora" in f.name for f in path.iterdir() if f.is_file())
    loaded = SentenceTransformer(str(path), device="cpu")
    assert not any("lora" in n for n, _ in loaded.named_parameters())  # merged: a plain model
    for role in ("query", "document"):
        ref = torch.as_tensor(loaded.encode(texts, prompt_name=role))
        torch.testing.assert_close(enc.encode(texts, role=role), ref, rtol=0, atol=1e-5)
    assert any("lora" in n for n, _ in enc.named_parameters())  # the encoder keeps training its adapters

"""scripts/train.py end to end with a decoder student (a random Qwen3 with last-token pooling and query
prompts), plain, with LoRA and with Matryoshka: it trains, exports a sentence-transformers folder whose
pooling is last-token, and the export's embeddings equal those of the trained encoder rebuilt from the
best checkpoint (gist.evaluation.runs). Tolerance: atol 1e-5 on unit vectors (the export is the same
function of the same weights; LoRA merged into them: measured <= 1e-7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_in_process, tiny

TEXTS = ["the cat plays piano", "what is my bank account", "i love pizza"]


def _run_dir(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "logs" / "quickstart" / "runs").iterdir()
    return run


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["model.lora={r:4,alpha:8}", "export_adapter=true"],
        ["loss.matryoshka_dims=[32,16,8]", "loss.matryoshka_weights=[1,1,0.5]"],
    ],
    ids=["full", "lora", "matryoshka"],
)
def test_decoder_student_trains_and_exports_last_token_pooling(
    tmp_path, tiny_qwen3, gist_file, mteb_dir, monkeypatch, extra
):
    from sentence_transformers import SentenceTransformer

    from gist.core.encoder import Encoder
    from gist.evaluation.runs import Run

    args = [*tiny(tmp_path, tiny_qwen3, None, gist_file, mteb_dir, guide=False), "guide=none", "loss=mnrl", *extra]
    run_in_process(args, monkeypatch)
    run = _run_dir(tmp_path)
    model_dir = run / "model"
    assert json.loads((model_dir / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    assert json.loads((model_dir / "config_sentence_transformers.json").read_text())["prompts"]["query"]
    exported = SentenceTransformer(str(model_dir), device="cpu")
    trained = Run(run).load_model("best")
    assert bool(trained.lora) == ("lora" in " ".join(extra))
    for role in ("query", "document"):
        ref = torch.as_tensor(exported.encode(TEXTS, prompt_name=role))
        torch.testing.assert_close(trained.encode(TEXTS, role=role), ref, rtol=0, atol=1e-5)
    base = Encoder(str(tiny_qwen3)).encode(TEXTS)
    assert (base - trained.encode(TEXTS)).abs().max() > 1e-4  # training changed the model
    if "lora" in " ".join(extra):
        assert (model_dir / "adapter" / "adapter_config.json").is_file()
        ckpt = torch.load(next((run / "checkpoints").glob("step*.ckpt")), map_location="cpu", weights_only=True)
        assert all("lora_" in k for k in ckpt["state_dict"] if k.startswith("student."))
    card = (model_dir / "README.md").read_text()
    assert str(tiny_qwen3) in card and "MNRLLoss" in card
    if "matryoshka" in " ".join(extra):
        assert "matryoshka_dims=[32, 16, 8]" in card


def test_lora_decoder_under_ddp_with_gathering_gradcache_and_the_guide_cache(
    tmp_path, tiny_qwen3, tiny_guide, gist_file, mteb_dir, monkeypatch
):
    """Two CPU processes (gloo): LoRA on the decoder, candidates gathered across ranks, GradCache, the guide
    cache prefilled: it trains, checkpoints hold the adapters only, and the export equals the trained encoder."""
    from sentence_transformers import SentenceTransformer

    from gist.evaluation.runs import Run

    args = [
        *tiny(tmp_path, tiny_qwen3, tiny_guide, gist_file, mteb_dir),
        "guide.pooling=mean",
        "trainer=ddp_sim",
        "model.lora={r:4,alpha:8}",
        "loss=gist_cached",
        "loss.mini_batch_size=3",
        "loss.gather_across_devices=true",
    ]
    run_in_process(args, monkeypatch)
    run = _run_dir(tmp_path)
    ckpt = torch.load(next((run / "checkpoints").glob("step*.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and all("lora_" in k for k in ckpt["state_dict"] if k.startswith("student."))
    trained = Run(run).load_model("best")
    exported = SentenceTransformer(str(run / "model"), device="cpu")
    torch.testing.assert_close(trained.encode(TEXTS), torch.as_tensor(exported.encode(TEXTS)), rtol=0, atol=1e-5)
    assert any((tmp_path / "cache" / "guide").rglob("*.emb.npy"))

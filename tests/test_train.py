"""End to end through scripts/train.py's `train(cfg)`: tiny random BERTs, real configs, export round trip."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.test_config import load

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
train_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_script)


def tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, overrides=()):
    guide = [] if "guide=none" in overrides else [f"guide.name={tiny_guide}", "guide.max_length=48"]
    cfg = load([
        "data=files", f"data.train_files=[{gist_file}]", "data.batch_size=8",
        f"data.val_sts_dir={mteb_dir / 'TinySTS'}", "data.val_batch_size=8",
        f"model.name={tiny_student}", "model.max_length=32",
        *guide,
        f"compare_tasks_dir={mteb_dir}", "logger=csv",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "optim.lr=1e-3",
        *overrides,
    ])
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        del cfg["hydra"]  # as in a @hydra.main app, the job config has no hydra node
    return cfg


def test_fast_dev_run(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr"])
    train_script.train(cfg)


@pytest.mark.parametrize("overrides", [["loss=mnrl", "guide=none"], ["loss=no_guide", "guide=none"], ["loss.margin=0.05", "loss.mask_self_pairs=true"], ["loss=gist_cached", "loss.mini_batch_size=3"]])
def test_fast_dev_run_loss_variants(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, overrides):
    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr", *overrides])
    train_script.train(cfg)


def test_bf16_mixed_trains_on_cpu(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr", "trainer.precision=bf16-mixed"])
    train_script.train(cfg)


def test_train_exports_a_sentence_transformers_model_with_identical_embeddings(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, capsys):
    from sentence_transformers import SentenceTransformer
    import torch.nn.functional as F

    from gist.encoder import Encoder

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir)
    metric = train_script.train(cfg)
    run = Path(cfg.paths.output_dir)
    assert metric is not None and -1 <= metric <= 1
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss", "train/masked_frac", "train/effective_negatives", "lr", "train/samples_per_s", "val/stsb_spearman"):
        assert name in metrics
    # The end-of-run table: base vs fine-tuned on every task folder of compare_tasks_dir, printed and saved.
    out = capsys.readouterr().out
    assert "MTEB main score x100: base" in out and "| task | base | fine_tuned | delta |" in out
    comparison = json.loads((run / "eval" / "comparison.json").read_text())
    assert [r["task"] for r in comparison["rows"]] == ["TinySTS", "TinyTopicClassification", "mean"]
    for row in comparison["rows"][:2]:
        assert f"| {row['task']} | {row['base']:.2f} | {row['fine_tuned']:.2f} | {row['delta']:+.2f} |" in out
    assert comparison["fine_tuned"]["step"] == int(next((run / "checkpoints").glob("step*.ckpt")).stem[4:10])
    assert (run / "eval" / "comparison.md").read_text().count("\n| Tiny") == 2

    # The exported folder is the BEST checkpoint's student, loadable exactly as in the README snippet.
    model = SentenceTransformer(str(run / "model"))
    texts = ["Understanding the REaLTabFormer model.", "Predicting human mobility holds significant practical value."]
    emb = model.encode(texts, convert_to_tensor=True)
    sim = F.cosine_similarity(emb.unsqueeze(1), emb.unsqueeze(0), dim=-1)
    assert sim.shape == (2, 2) and torch.allclose(sim.diagonal(), torch.ones(2), atol=1e-5)
    best = next((run / "checkpoints").glob("step*.ckpt"))
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    enc = Encoder(str(tiny_student))
    enc.load_state_dict({k.removeprefix("student."): v for k, v in state.items()})
    torch.testing.assert_close(emb.cpu(), enc.encode(texts), atol=1e-5, rtol=1e-4)
    # ...and it differs from the untrained model (training happened).
    assert not torch.allclose(emb.cpu(), Encoder(str(tiny_student)).encode(texts), atol=1e-4)

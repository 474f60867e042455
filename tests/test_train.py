"""End to end through `gist.train.train(cfg)`: tiny random BERTs, real configs, export round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gist.train import train
from tests.helpers import assert_metric, assert_run_files, tiny_cfg


def test_fast_dev_run(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr"])
    assert_metric(train(cfg))  # fast_dev_run validates once
    assert_run_files(Path(cfg.paths.output_dir), model=False)  # debug=fdr: export=false, compare_tasks_dir=null


# Slow variants: the default tier trains GIST (test_fast_dev_run), no_guide and GradCache (here), mnrl
# (test_bad_input.py, test_security.py, test_faults.py); margins and self-pair masks are test_losses.py's.
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["loss=mnrl", "guide=none"], marks=pytest.mark.slow),
        ["loss=no_guide", "guide=none"],
        pytest.param(["loss.margin=0.05", "loss.mask_self_pairs=true"], marks=pytest.mark.slow),
        ["loss=gist_cached", "loss.mini_batch_size=3"],
    ],
)
def test_fast_dev_run_loss_variants(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, overrides):
    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr", *overrides])
    assert_metric(train(cfg))
    assert_run_files(Path(cfg.paths.output_dir), model=False)


def test_bf16_mixed_trains_on_cpu(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    cfg = tiny_cfg(
        tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, ["debug=fdr", "trainer.precision=bf16-mixed"]
    )
    assert_metric(train(cfg))
    assert_run_files(Path(cfg.paths.output_dir), model=False)


def test_train_exports_a_sentence_transformers_model_with_identical_embeddings(
    tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, capsys
):
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from gist.core.encoder import Encoder

    cfg = tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir)
    assert_metric(train(cfg))
    run = Path(cfg.paths.output_dir)
    assert_run_files(run, evaluation=True)
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in (
        "train/loss",
        "train/masked_frac",
        "train/effective_negatives",
        "lr",
        "train/samples_per_s",
        "val/stsb_spearman",
    ):
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

    # The model card names the base, the guide, the loss and the end-of-run scores.
    card = (run / "model" / "README.md").read_text()
    assert str(tiny_student) in card and str(tiny_guide) in card and "GISTLoss" in card and "temperature=0.01" in card
    assert "| TinySTS |" in card and "solatorio2024gistembed" in card
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

"""Where encoding runs outside a training step: mining and evaluation on `inference_device()` (the first CUDA
device when there is one), the guide-cache prefill on the trainer's device (prepare_data runs before
Lightning moves the module there). On this CPU machine the devices are all "cpu": these tests check that
each path asks the right owner, and that Encoder.encode runs (and stays) where it is told."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer

import gist.core.encoder as encoder_module
import gist.evaluation.harness as harness
from gist.core.encoder import Encoder, inference_device
from gist.core.guide_cache import GuideCache
from gist.data.datamodule import GISTDataModule
from gist.data.mining import MinedTriplets
from gist.evaluation.tasks import load_tasks


class Spy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> torch.device:
        self.calls += 1
        return torch.device("cpu")


def test_inference_device_is_cuda_when_available():
    assert inference_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_encode_runs_where_it_is_told_and_returns_cpu_fp32(tiny_student):
    enc = Encoder(str(tiny_student))
    out = enc.encode(["a b c", "d"], device="cpu")
    assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape == (2, enc.dim)
    assert next(enc.parameters()).device.type == "cpu"
    assert enc.training  # encode restores the mode it found


def test_evaluation_encodes_on_the_inference_device(monkeypatch, tiny_student, mteb_dir):
    spy = Spy()
    monkeypatch.setattr(harness, "inference_device", spy)
    harness.evaluate(harness.pretrained_model(Encoder(str(tiny_student))), load_tasks(mteb_dir, ["TinySTS"]))
    assert spy.calls >= 1


def test_mining_encodes_on_the_inference_device(monkeypatch, tmp_path, mteb_dir, tiny_guide):
    spy = Spy()
    monkeypatch.setattr(encoder_module, "inference_device", spy)
    MinedTriplets(str(mteb_dir / "TinyTopicClassification"), guide=str(tiny_guide)).materialize(tmp_path)
    assert spy.calls == 1


def test_guide_cache_prefill_runs_on_the_trainers_device(monkeypatch, tmp_path, tiny_student, tiny_guide, gist_file):
    student, guide = Encoder(str(tiny_student)), Encoder(str(tiny_guide))
    cache = GuideCache.for_encoder(tmp_path / "cache", guide)
    devices = []
    fill = GuideCache.fill

    def recording_fill(self, encoder, items, batch_size=64, device=None):
        devices.append(device)
        return fill(self, encoder, items, batch_size, device)

    monkeypatch.setattr(GuideCache, "fill", recording_fill)
    dm = GISTDataModule(train_files=[str(gist_file)], batch_size=8)
    dm.configure_encoders(student, guide, guide_cache=cache, prefill_guide_cache=True)
    dm.trainer = Trainer(accelerator="cpu", logger=False, max_steps=1)
    dm.prepare_data()
    assert devices == [dm.trainer.strategy.root_device] and len(cache) > 0

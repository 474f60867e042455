"""Hydra configs: every experiment composes; the recipes carry GIST_SPEC's values; hub-only parts fail fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def load(overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_default_is_the_quickstart():
    cfg = load()
    assert cfg.task_name == "quickstart"
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.guide.name == "sentence-transformers/all-mpnet-base-v2"
    assert cfg.loss._target_ == "gist.losses.GISTLoss" and cfg.loss.temperature == 0.01
    assert cfg.mining.seed == 1029 and cfg.mining.max_texts is not None  # subsampled, said in the config
    tasks = [Path(d.task_dir).name for d in cfg.data.derived]
    assert tasks == ["AmazonCounterfactualClassification", "Banking77Classification", "EmotionClassification",
                     "TweetSentimentExtractionClassification", "STSBenchmark"]
    assert all(d.get("split", "train") == "train" for d in cfg.data.derived)
    assert cfg.data.val_split == "validation"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_its_parts_resolve(experiment):
    cfg = load([f"experiment={experiment}"])
    assert cfg.task_name == experiment
    for group in ("model", "loss", "data", "trainer"):
        assert cfg[group]._target_
    instantiate(cfg.loss)


def test_gist_small_carries_the_released_recipe():
    cfg = load(["experiment=gist_small"])
    assert cfg.model.name == "BAAI/bge-small-en-v1.5" and cfg.model.pooling == "cls" and cfg.model.max_length == 512
    assert cfg.guide.name == "WhereIsAI/UAE-Large-V1" and cfg.guide.pooling == "mean" and cfg.guide.max_length == 512
    (hub,) = cfg.data.hub_datasets
    assert hub.path == "avsolatorio/medi-data-mteb_avs_triplets"
    assert hub.revision == "238a0499b6e6b690cc64ea56fde8461daa8341bb"
    assert cfg.data.batch_size == 16 and cfg.data.prepend_instructions is False
    assert cfg.optim.lr == 5e-6 and cfg.optim.weight_decay == 0.0
    assert cfg.optim.warmup_steps == 454_700 and cfg.optim.schedule_steps == 4_547_000
    assert cfg.trainer.max_steps == 302_500 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.devices == 1
    assert cfg.loss.temperature == 0.01 and cfg.loss.margin == 0.0


def test_gist_minilm_recipe():
    cfg = load(["experiment=gist_minilm"])
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.guide.name == "WhereIsAI/UAE-Large-V1" and cfg.guide.pooling == "mean"
    assert cfg.trainer.max_steps == 102_000 and cfg.optim.lr == 5e-6 and cfg.data.batch_size == 16


@pytest.mark.parametrize("loss,target", [("gist", "GISTLoss"), ("no_guide", "NoGuideLoss"), ("mnrl", "MNRLLoss")])
def test_loss_group_selects_the_implementation(loss, target):
    cfg = load([f"loss={loss}"])
    assert type(instantiate(cfg.loss)).__name__ == target


def test_guide_none_removes_the_guide():
    assert load(["guide=none", "loss=mnrl"]).guide is None


def test_medi_fails_fast_offline_with_instructions():
    from gist.data import DataError

    cfg = load(["experiment=gist_small"])
    dm = instantiate(cfg.data)
    with pytest.raises(DataError) as err:
        dm.check_sources()
    assert "avsolatorio/medi-data-mteb_avs_triplets@238a0499" in str(err.value) and "train_files" in str(err.value)

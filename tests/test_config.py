"""Hydra configs: every experiment composes; the recipes carry the released values (paper, model cards); hub-only parts fail fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.helpers import CONF, load

pytestmark = pytest.mark.unit
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_default_is_the_quickstart():
    cfg = load()
    assert cfg.task_name == "quickstart"
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.guide.name == "sentence-transformers/all-mpnet-base-v2"
    assert cfg.loss._target_ == "gist.core.loss_modules.GISTLoss" and cfg.loss.temperature == 0.01
    assert cfg.mining.seed == 1029 and cfg.mining.max_texts is not None  # subsampled, said in the config
    mined, sts = instantiate(cfg.data.derived)  # the mining block is written once: a list of task folders
    tasks = [m.task_dir.name for m in mined] + [Path(sts.task_dir).name]
    assert tasks == [
        "AmazonCounterfactualClassification",
        "Banking77Classification",
        "EmotionClassification",
        "TweetSentimentExtractionClassification",
        "STSBenchmark",
    ]
    assert all(s.split == "train" for s in [*mined, sts])
    assert {(m.seed, m.max_texts, m.guide["name"]) for m in mined} == {(1029, cfg.mining.max_texts, cfg.mining.guide)}
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
    assert cfg.data.batch_size == 16 and cfg.model.instructions is None  # GIST dropped the instructions
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
    from gist.data.records import DataError

    cfg = load(["experiment=gist_small"])
    dm = instantiate(cfg.data)
    with pytest.raises(DataError) as err:
        dm.check_sources()
    assert "avsolatorio/medi-data-mteb_avs_triplets@238a0499" in str(err.value) and "train_files" in str(err.value)


def test_seed_reseeds_the_batch_order_of_every_experiment():
    """Regression: experiment=gist_small hard-coded data.seed=42, so `seed=7` reseeded Lightning but not
    the batch order. data.seed follows the top-level seed in every experiment."""
    for experiment in EXPERIMENTS:
        assert load([f"experiment={experiment}", "seed=7"]).data.seed == 7


def test_experiments_restate_no_defaults():
    """An experiment is a delta: no value it sets equals what the root defaults plus its group overrides
    already give (`~experiment`: the root config without any experiment)."""
    import yaml
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    for experiment in EXPERIMENTS:
        text = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())
        groups = [
            f"{k.removeprefix('override /')}={v}"
            for d in text.get("defaults", [])
            if isinstance(d, dict)
            for k, v in d.items()
            if k.startswith("override /")
        ]
        base = load(["~experiment", *groups])
        values = {k: v for k, v in text.items() if k not in ("defaults", "task_name", "tags")}
        restated = [k for k, v in leaves(values) if OmegaConf.select(base, k, default="<missing>") == v]
        assert not restated, f"experiment={experiment} restates defaults: {restated}"


@pytest.mark.parametrize(
    "overrides",
    [["loss=gist", "guide=none"], ["loss=gist_cached", "guide=none"], ["loss=mnrl"], ["loss=no_guide", "guide=minilm"]],
)
def test_an_incompatible_loss_and_guide_stop_with_one_message(overrides):
    """One owner decides whether there is a guide (gist.core.module.check_guide); guide=none does not
    rewrite the loss group, and a loss/guide pair that does not go together is one clear error."""
    from gist.core.module import GuideMismatchError, check_guide

    cfg = load(overrides)
    assert cfg.loss._target_.endswith(("GISTLoss", "NoGuideLoss", "MNRLLoss"))
    with pytest.raises(GuideMismatchError, match="guide=none|needs a guide"):
        check_guide(instantiate(cfg.loss), cfg.guide is not None)


@pytest.mark.parametrize("overrides", [["guide=none", "loss=no_guide"], ["guide=none", "loss=mnrl"], ["guide=minilm"]])
def test_compatible_loss_and_guide_pairs_pass(overrides):
    from gist.core.module import check_guide

    cfg = load(overrides)
    check_guide(instantiate(cfg.loss), cfg.guide is not None)
    assert load(["guide=none", "loss=mnrl"]).loss._target_.endswith("MNRLLoss")  # guide=none keeps the chosen loss


def test_the_quickstart_datamodule_gets_one_source_per_mined_task_and_the_sts_pairs():
    """Regression: Hydra hands mine_tasks' list to the datamodule as a ListConfig of objects; it must be
    flattened into one derived source per task (the quickstart failed before mining with a ListConfig)."""
    cfg = load()
    dm = instantiate(cfg.data)
    names = [type(s).__name__ for s in dm.derived]
    assert names == ["MinedTriplets"] * 4 + ["StsPairs"]
    assert [s.task_dir.name for s in dm.derived[:4]] == list(cfg.mining.tasks)

"""Configs saved by runs of the old package layout (gist/losses.py, gist/encoder.py, gist/data.py, ...)
still load: every moved `_target_` is rewritten to its new module, and an unknown one says what changed."""

from __future__ import annotations

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from gist.infra.compat import MOVED_MODULES, OldConfigError, upgrade_config

pytestmark = pytest.mark.unit

# A config.yaml as the old layout wrote it (targets copied from a run folder of 2026-11-27).
OLD = """
model: {_target_: gist.encoder.Encoder, name: sentence-transformers/all-MiniLM-L6-v2}
loss: {_target_: gist.losses.GISTLoss, temperature: 0.01}
data:
  _target_: gist.datamodule.GISTDataModule
  derived:
    - {_target_: gist.mining.MinedTriplets, task_dir: x}
    - {_target_: gist.mining.StsPairs, task_dir: y}
trainer:
  plugins: [{_target_: gist.checkpoint.AtomicCheckpointIO}]
callbacks:
  seed: {_target_: gist.callbacks.StepSeed}
logger:
  wandb: {_target_: gist.loggers.wandb_logger}
batches: {_target_: gist.data.SameTaskBatches}
other: {_target_: lightning.pytorch.Trainer}
"""


def test_old_targets_are_rewritten_to_classes_that_exist():
    cfg, changes = upgrade_config(OmegaConf.create(OLD))
    assert cfg.loss._target_ == "gist.core.loss_modules.GISTLoss"
    assert cfg.model._target_ == "gist.core.encoder.Encoder"
    assert cfg.data.derived[1]._target_ == "gist.data.mining.StsPairs"
    assert cfg.trainer.plugins[0]._target_ == "gist.infra.checkpoint.AtomicCheckpointIO"
    assert cfg.other._target_ == "lightning.pytorch.Trainer"  # not ours: untouched
    assert len(changes) == 9 and all(old.count(".") == 2 for old in changes)  # gist.<old module>.<name>
    for new in changes.values():
        if new.endswith("wandb_logger"):
            continue  # a function, not a class
        get_class(new)
    assert upgrade_config(cfg)[1] == {}  # today's layout: nothing to change


def test_a_target_in_neither_layout_names_the_moves():
    with pytest.raises(OldConfigError, match=r"gist\.losses\.FancyLoss.*gist\.losses -> gist\.core\.loss_modules"):
        upgrade_config(OmegaConf.create({"loss": {"_target_": "gist.losses.FancyLoss"}}))


def test_every_old_module_maps_to_a_module_that_imports():
    import importlib

    for new in MOVED_MODULES.values():
        importlib.import_module(new)


def test_run_view_upgrades_an_old_run_folder(tmp_path):
    from gist.evaluation.runs import Run

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text(OLD + "task_name: old\n")
    assert Run(tmp_path).config.loss._target_ == "gist.core.loss_modules.GISTLoss"


@pytest.mark.parametrize("prepend", [True, False])
def test_data_level_instructions_become_each_encoders_setting(prepend):
    from gist.core.inputs import TextInputs

    old = OmegaConf.create(
        {
            "model": {"_target_": "gist.core.encoder.Encoder", "name": "m"},
            "guide": {"_target_": "gist.core.encoder.Encoder", "name": "g"},
            "data": {"batch_size": 8, "prepend_instructions": prepend},
        }
    )
    cfg, changes = upgrade_config(old)
    assert "prepend_instructions" not in cfg.data and len(changes) == 1
    for key in ("model", "guide"):
        templates = cfg[key].get("instructions")
        if not prepend:
            assert templates is None
            continue
        # The old switch wrote "<instruction> <text>": the upgraded templates give the same strings.
        inputs = TextInputs(None, 8, instructions=dict(templates))
        assert inputs.texts(["a text"], "query", ["Represent the query:"]) == ["Represent the query: a text"]
        assert inputs.texts(["a doc"], "document", ["Represent the doc:"]) == ["Represent the doc: a doc"]

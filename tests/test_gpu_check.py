"""scripts/gpu_check.sh, the first-GPU check: on this CPU it must say what it skips and still write its JSON;
with --device cpu the GPU code path (step settings, MFU, the short quickstart) runs end to end on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT, tiny


def test_gpu_check_skips_the_cuda_parts_with_a_message_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "check.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PY": os.environ.get("PY", sys.executable)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout and "skipping" in proc.stdout
    result = json.loads(out.read_text())  # OUT is relative to the caller's folder
    assert result["machine"]["cuda"] is None and "cpu_flags" in result["machine"]
    assert "skipped" in result and "steps" not in result


def test_gpu_check_runs_its_gpu_path_on_cpu(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir):
    from gist.analysis import gpu_check

    out = tmp_path / "check.json"
    overrides = tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, steps=2)
    args = ["--device", "cpu", "--out", str(out), "--student", str(tiny_student), "--guide", str(tiny_guide)]
    args += ["--batch", "4", "--big-batch", "8", "--steps", "3", "--warmup", "1", "--quickstart-steps", "2"]
    assert gpu_check.main([*args, "--quickstart-overrides", *overrides]) == 0
    result = json.loads(out.read_text())
    rows = result["steps"]
    settings = {
        (r["batch"], r["precision"], r["attn"], r["bucket_size"], r["bucket_tokens"], r["packing"]) for r in rows
    }
    assert (4, "32-true", "sdpa", 8, None, False) in settings and (8, "bf16-mixed", "eager", 8, None, False) in settings
    assert (8, "bf16-mixed", "sdpa", None, 4096, False) in settings and (
        8,
        "bf16-mixed",
        "sdpa",
        None,
        None,
        True,
    ) in settings
    assert (4, "bf16-mixed", "sdpa", 8, None, True) in settings  # packed, attention in groups of 8
    assert len(settings) == len(rows) == 13
    for r in rows:
        assert r["step_s"] > 0 and r["samples_per_s"] == r["batch"] / r["step_s"]
        assert r["mfu"] == r["model_tflops_per_s"] / result["mfu_peak_tflops"] and 0 < r["mfu"] < 1
    quick = result["quickstart"]
    assert quick["returncode"] == 0 and quick["steps"] == 2 and quick["wall_s"] > 0
    assert -1 <= quick["final_val_stsb_spearman"] <= 1

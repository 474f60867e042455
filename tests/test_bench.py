"""`make bench` code paths (gist.analysis.bench, bench_table), on the tiny random models (the real benchmark runs MiniLM/mpnet: minutes)."""

from __future__ import annotations

import json

import pytest
import torch

from gist.analysis import bench
from gist.analysis.bench_table import main as bench_table_main
from gist.analysis.bench_table import table


@pytest.mark.unit
def test_bench_pairs_are_fixed_same_label_pairs():
    pairs = bench.bench_pairs(40)
    assert len(pairs) == 40 and pairs == bench.bench_pairs(40)
    assert all(a != p for a, p in pairs)


# Slow variants: bucketing is also {"bucket_size": 3, ...}; GradCache in training is test_train.py's loss=gist_cached.
@pytest.mark.parametrize(
    "options",
    [
        {},
        pytest.param({"bucket_size": 2}, marks=pytest.mark.slow),
        {"bucket_size": 3, "cache": True},
        pytest.param({"mini_batch_size": 2}, marks=pytest.mark.slow),
    ],
)
def test_ours_step_time_runs_every_configuration(tiny_student, tiny_guide, tmp_path, options):
    pairs = bench.bench_pairs(4 * 4)
    cache = str(tmp_path / "cache") if options.pop("cache", False) else None
    step = bench.ours_step_time(pairs, str(tiny_student), str(tiny_guide), 4, 4, 1, cache_dir=cache, **options)
    assert 0 < step < 60
    if cache:
        assert any((tmp_path / "cache").rglob("*.npy"))  # the guide embeddings were prefilled


def test_st_step_time_runs(tiny_student, tiny_guide):
    step = bench.st_step_time(bench.bench_pairs(12), str(tiny_student), str(tiny_guide), 4, 3, 1)
    assert 0 < step < 60


@pytest.mark.unit
def test_compare_reports_throughput_and_ratio():
    row = bench.compare("x", 16, [2.0, 1.0, 3.0], [4.0, 4.0])
    assert row["ours_step_s"] == 2.0 and row["ours_pairs_per_s"] == 8.0
    assert row["st_pairs_per_s"] == 4.0 and row["ratio"] == 2.0


@pytest.mark.unit
def test_bench_table_marks_targets_met_and_missed(tmp_path, capsys):
    result = {
        "same_work_fp32": {"ours_pairs_per_s": 13.0, "st_pairs_per_s": 9.0, "ratio": 1.44, "ours_step_s": 1.2},
        "machine": {"bf16_units": True, "cuda": None},
        "mpnet_guide_cached_fp32": {
            "ours_pairs_per_s": 20.0,
            "st_pairs_per_s": 4.0,
            "ratio": 5.0,
            "ours_step_s": 0.8,
            "st_step_s": 4.0,
        },
        "mpnet_guide_cached_bf16": {
            "ours_pairs_per_s": 1.0,
            "st_pairs_per_s": 4.0,
            "ratio": 0.25,
            "ours_step_s": 16.0,
            "st_step_s": 4.0,
            "st_setting": "fp32",
            "bf16_over_fp32": 20.0,
        },
        "gradcache_memory": {
            "gradcache_batch": 1024,
            "mini_batch_size": 32,
            "gradcache_peak_rss_mib": 900.0,
            "plain_batch": 64,
            "plain_peak_rss_mib": 800.0,
            "ratio": 1.125,
            "growth_over_fit_start_mib": {"plain_64": 300.0},
        },
        "flop_bound": {
            "step_s": 0.9,
            "bound_s": 0.5,
            "flops_per_step": 4.8e10,
            "matmul_peak_gflops": 98.0,
            "precision": "fp32",
            "step_over_bound": 1.8,
        },
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    assert bench_table_main([str(path)]) == 0  # scripts/bench_table.py
    out = capsys.readouterr().out
    assert out == table(result) + "\n"
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| `")}
    assert lines["`same_work_fp32`"].endswith(">= 1.1: met |")
    assert "(fp32)" in lines["`mpnet_guide_cached_bf16`"]
    # The best precision here is fp32 (0.8 s vs 16 s): 16 pairs / 0.8 s = 20 pairs/s, 5x the 4 s step.
    assert (
        lines["`cached_best`"]
        == "| `cached_best` | 20.0 pairs/s (fp32, 0.800 s/step) | 4.0 pairs/s | 5.00 | >= 4: met |"
    )
    assert lines["`bf16_over_fp32`"].endswith("| 20.00 | <= 0.5: MISSED |")
    assert lines["`gradcache_memory`"].endswith("<= 2: met |")
    assert lines["`flop_bound`"].endswith("<= 1.5: MISSED |")
    assert "| plain_64 | 300 |" in out
    # Padding-free rows: the best setting is now bf16 packed (16 pairs / 0.4 s = 40 pairs/s, 10x the 4 s
    # step), and the packed bf16/fp32 ratio (0.4 / 0.64) has its own row.
    step = {"st_pairs_per_s": 4.0, "st_step_s": 4.0}
    result["mpnet_guide_cached_fp32_packed"] = {**step, "ours_pairs_per_s": 25.0, "ratio": 6.25, "ours_step_s": 0.64}
    result["mpnet_guide_cached_bf16_packed"] = {
        **step,
        "ours_pairs_per_s": 40.0,
        "ratio": 10.0,
        "ours_step_s": 0.4,
        "bf16_over_fp32": 0.625,
    }
    lines = {line.split("|")[1].strip(): line for line in table(result).splitlines() if line.startswith("| `")}
    assert (
        lines["`cached_best`"]
        == "| `cached_best` | 40.0 pairs/s (bf16 packed, 0.400 s/step) | 4.0 pairs/s | 10.00 | >= 4: met |"
    )
    assert lines["`bf16_over_fp32_packed`"] == (
        "| `bf16_over_fp32_packed` | bf16 step 0.400 s | fp32 step 0.640 s | 0.62 | <= 0.5: MISSED |"
    )
    assert lines["`bf16_over_fp32`"].endswith("| 20.00 | <= 0.5: MISSED |")


def test_decoder_student_steps_on_both_sides(tiny_qwen3, tiny_guide):
    """The decoder_fp32 key's two sides on a tiny random Qwen3 (last-token pooling, left padding)."""
    pairs = bench.bench_pairs(12)
    assert 0 < bench.ours_step_time(pairs, str(tiny_qwen3), str(tiny_guide), 4, 3, 1, bucket_size=3) < 60
    assert 0 < bench.st_step_time(pairs, str(tiny_qwen3), str(tiny_guide), 4, 3, 1) < 60


@pytest.mark.unit
def test_machine_info_names_the_cpu_and_its_bf16_units():
    info = bench.cpu_info()
    assert info["cpu"]
    if "cpu_flags" in info:
        assert info["bf16_units"] == bool({"avx512_bf16", "amx_bf16"} & set(info["cpu_flags"]))


def test_profile_step_table_and_host_syncs(tiny_student, tiny_guide, capsys, tmp_path):
    """scripts/profile_step.py's code path on the tiny models: per-op rows whose shares add up to 1, the
    host syncs per step counted from `aten::_local_scalar_dense`, the markdown table."""
    from gist.analysis import profile_step

    out = tmp_path / "profile.json"
    args = ["--student", str(tiny_student), "--guide", str(tiny_guide), "--batch", "4", "--steps", "4"]
    assert profile_step.main([*args, "--warmup", "2", "--bucket-size", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["profiled_steps"] == 2 and result["step_s"] > 0
    assert sum(r["share"] for r in result["rows"]) == pytest.approx(1.0)
    assert any(r["op"] == "aten::mm" or r["op"] == "aten::addmm" for r in result["rows"])
    # The CPU fused AdamW reads every parameter's step count inside its kernel: not counted as host syncs.
    reads = sum(r["calls_per_step"] for r in result["rows"] if r["op"] == profile_step.SYNC_OP)
    assert 0 < result["host_syncs_per_step"] < reads
    assert result["host_syncs_per_step"] == pytest.approx(sum(result["host_syncs_by_caller"].values()))
    printed = capsys.readouterr().out
    assert "| op | self CPU ms/step | share | calls/step |" in printed and "host syncs per step" in printed


def test_levers_key_times_every_setting(tiny_student, tiny_guide):
    """`--keys levers` on the tiny models: every setting of issue #15 fits and is timed, relative to fp32."""
    from gist.analysis.bench_levers import SETTINGS, levers_key

    pairs = bench.bench_pairs(12)
    out = levers_key(pairs, 4, 3, 1, 1, student=str(tiny_student), guide=str(tiny_guide))
    assert set(out) == set(SETTINGS) and out["fp32"]["vs_fp32"] == 1.0
    for row in out.values():
        assert row["step_s"] > 0 and len(row["repeats_s"]) == 1 and row["first_step_s"][0] > 0
    assert out["bf16_eager"]["precision"] == "bf16-mixed" and out["bf16_eager"]["attn_implementation"] == "eager"
    lines = table({"levers": out}).splitlines()
    assert "| fp32 | " in "\n".join(lines) and any(line.startswith("| bf16_true_bound |") for line in lines)


@pytest.mark.unit
def test_flop_bound_takes_the_fastest_cached_setting(monkeypatch):
    """The bound is for the fastest cached-guide step over precisions and groupings (buckets, packed)."""
    monkeypatch.setattr(bench, "mean_tokens", lambda model, texts: 20.0)
    monkeypatch.setattr(bench, "encoder_flops_per_text", lambda model, tokens: 1e9)
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda dtype, reps=3: 100.0 if dtype == torch.float32 else 400.0)
    result = {f"mpnet_guide_cached_{k}": {"ours_step_s": s} for k, s in [("fp32", 0.5), ("fp32_packed", 0.45)]}
    result |= {f"mpnet_guide_cached_{k}": {"ours_step_s": s} for k, s in [("bf16", 0.4), ("bf16_packed", 0.3)]}
    bench.flop_bound_key(result, [("a", "b")] * 4, 16)
    fb = result["flop_bound"]
    assert fb["precision"] == "bf16" and fb["config"].startswith("mpnet_guide_cached_bf16_packed ")
    assert fb["steps_s"] == {"fp32": 0.45, "bf16": 0.3}
    # 2 x 16 pairs x 3 forward-equivalents x 1 GFLOP = 96 GFLOP at 400 GFLOP/s = 0.24 s; 0.3 / 0.24 = 1.25
    assert (
        fb["flops_per_step"] == 96e9
        and fb["bound_s"] == pytest.approx(0.24)
        and fb["step_over_bound"] == pytest.approx(1.25)
    )

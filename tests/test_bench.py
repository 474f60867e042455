"""`make bench` code paths, on the tiny random models (the real benchmark runs MiniLM/mpnet: minutes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _script("bench")


def test_bench_pairs_are_fixed_same_label_pairs(bench):
    pairs = bench.bench_pairs(40)
    assert len(pairs) == 40 and pairs == bench.bench_pairs(40)
    assert all(a != p for a, p in pairs)


@pytest.mark.parametrize("options", [{}, {"bucket_size": 2}, {"bucket_size": 3, "cache": True}, {"mini_batch_size": 2}])
def test_ours_step_time_runs_every_configuration(bench, tiny_student, tiny_guide, tmp_path, options):
    pairs = bench.bench_pairs(4 * 4)
    cache = str(tmp_path / "cache") if options.pop("cache", False) else None
    step = bench.ours_step_time(pairs, str(tiny_student), str(tiny_guide), 4, 4, 1, cache_dir=cache, **options)
    assert 0 < step < 60
    if cache:
        assert any((tmp_path / "cache").rglob("*.npy"))  # the guide embeddings were prefilled


def test_st_step_time_runs(bench, tiny_student, tiny_guide):
    step = bench.st_step_time(bench.bench_pairs(12), str(tiny_student), str(tiny_guide), 4, 3, 1)
    assert 0 < step < 60


def test_compare_reports_throughput_and_ratio(bench):
    row = bench.compare("x", 16, [2.0, 1.0, 3.0], [4.0, 4.0])
    assert row["ours_step_s"] == 2.0 and row["ours_pairs_per_s"] == 8.0
    assert row["st_pairs_per_s"] == 4.0 and row["ratio"] == 2.0


def test_bench_table_marks_targets_met_and_missed(tmp_path, capsys):
    table = _script("bench_table")
    result = {
        "same_work_fp32": {"ours_pairs_per_s": 13.0, "st_pairs_per_s": 9.0, "ratio": 1.44, "ours_step_s": 1.2},
        "mpnet_guide_cached_bf16": {"ours_pairs_per_s": 1.0, "st_pairs_per_s": 4.0, "ratio": 0.25,
                                    "ours_step_s": 16.0, "st_setting": "fp32"},
        "gradcache_memory": {"gradcache_batch": 1024, "mini_batch_size": 32, "gradcache_peak_rss_mib": 900.0,
                             "plain_batch": 64, "plain_peak_rss_mib": 800.0, "ratio": 1.125,
                             "growth_over_fit_start_mib": {"plain_64": 300.0}},
        "flop_bound": {"step_s": 0.9, "bound_s": 0.5, "flops_per_step": 4.8e10, "matmul_peak_gflops": 98.0,
                       "precision": "fp32", "step_over_bound": 1.8},
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    assert table.main([str(path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| `")}
    assert lines["`same_work_fp32`"].endswith(">= 1.1: met |")
    assert lines["`mpnet_guide_cached_bf16`"].endswith(">= 4: MISSED |") and "(fp32)" in lines["`mpnet_guide_cached_bf16`"]
    assert lines["`gradcache_memory`"].endswith("<= 2: met |")
    assert lines["`flop_bound`"].endswith("<= 1.5: MISSED |")
    assert "| plain_64 | 300 |" in out

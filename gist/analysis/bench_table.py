"""The JSON of `make bench` (scripts/bench.py --out FILE) as the markdown table of docs/PERFORMANCE.md.

    from gist.analysis.bench_table import table
    print(table(json.loads(Path("bench.json").read_text())))

`main` is scripts/bench_table.py's command line. Each key with a target (TARGETS) says whether it met it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CACHED = "mpnet_guide_cached_"
TARGETS = {
    "same_work_fp32": ("ratio", ">=", 1.1),
    "decoder_fp32": ("ratio", ">=", 1.1),
    "cached_best": ("ratio", ">=", 4.0),
    "bf16_over_fp32": ("bf16_over_fp32", "<=", 0.5),
    "gradcache_memory": ("ratio", "<=", 2.0),
    "flop_bound": ("step_over_bound", "<=", 1.5),
}


def _verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    _, op, bound = TARGETS[key]
    met = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g}: {'met' if met else 'MISSED'}"


def table(result: dict) -> str:
    lines = [
        "| key | ours | sentence-transformers | ratio | target |",
        "|---|---:|---:|---:|---|",
    ]
    for key, row in result.items():
        if isinstance(row, dict) and "ours_pairs_per_s" in row:
            setting = f" ({row['st_setting']})" if "st_setting" in row else ""
            lines.append(
                f"| `{key}` | {row['ours_pairs_per_s']:.1f} pairs/s ({row['ours_step_s']:.2f} s/step) "
                f"| {row['st_pairs_per_s']:.1f} pairs/s{setting} | {row['ratio']:.2f} | {_verdict(key, row['ratio'])} |"
            )
    mem = result.get("gradcache_memory")
    if mem:
        lines.append(
            f"| `gradcache_memory` | GradCache batch {mem['gradcache_batch']} (mini {mem['mini_batch_size']}): "
            f"{mem['gradcache_peak_rss_mib']:.0f} MiB peak | plain batch {mem['plain_batch']}: "
            f"{mem['plain_peak_rss_mib']:.0f} MiB peak | {mem['ratio']:.2f} | {_verdict('gradcache_memory', mem['ratio'])} |"
        )
    lora = result.get("lora_memory")
    if lora:
        lines.append(
            f"| `lora_memory` | LoRA r={lora['lora']['r']}: {lora['lora_peak_rss_mib']:.0f} MiB peak | full fine-tuning: "
            f"{lora['full_peak_rss_mib']:.0f} MiB peak (batch {lora['batch']}) "
            f"| {lora['lora_peak_rss_mib'] / lora['full_peak_rss_mib']:.2f} | |"
        )
    fb = result.get("flop_bound")
    if fb:
        lines.append(
            f"| `flop_bound` | step {fb['step_s']:.2f} s | bound {fb['bound_s']:.2f} s = {fb['flops_per_step'] / 1e9:.1f} GFLOP "
            f"at {fb['matmul_peak_gflops']:.0f} GFLOP/s ({fb['precision']}) | {fb['step_over_bound']:.2f} "
            f"| {_verdict('flop_bound', fb['step_over_bound'])} |"
        )
    cached = {k[len(CACHED) :]: v for k, v in result.items() if k.startswith(CACHED)}  # "fp32", "bf16_packed", ...
    if {
        "fp32",
        "bf16",
    } <= cached.keys():  # the cached-guide step at this machine's best setting vs sentence-transformers' best
        best = min(cached, key=lambda k: cached[k]["ours_step_s"])
        ours = cached[best]["ours_step_s"]
        st = min(v["st_step_s"] for v in cached.values())
        batch = round(cached["fp32"]["ours_pairs_per_s"] * cached["fp32"]["ours_step_s"])
        lines.append(
            f"| `cached_best` | {batch / ours:.1f} pairs/s ({best.replace('_', ' ')}, {ours:.3f} s/step) "
            f"| {batch / st:.1f} pairs/s | {st / ours:.2f} | {_verdict('cached_best', st / ours)} |"
        )
    machine = result.get("machine", {})
    for suffix in ("", "_packed"):
        bf16, fp32 = cached.get("bf16" + suffix), cached.get("fp32" + suffix)
        if not (bf16 and fp32 and "bf16_over_fp32" in bf16):
            continue
        has_units = machine.get("bf16_units") or machine.get("cuda")
        target = _verdict("bf16_over_fp32", bf16["bf16_over_fp32"]) if has_units else "no bf16 units: not a target"
        lines.append(
            f"| `bf16_over_fp32{suffix}` | bf16 step {bf16['ours_step_s']:.3f} s | fp32 step "
            f"{fp32['ours_step_s']:.3f} s | {bf16['bf16_over_fp32']:.2f} | {target} |"
        )
    levers = result.get("levers")
    if levers:
        lines += ["", "Levers (`--keys levers`): the cached-guide step under each setting, s/step (vs fp32):", ""]
        lines += ["| setting | s/step | vs fp32 | first step (s) |", "|---|---:|---:|---:|"]
        lines += [
            f"| {k} | {v['step_s']:.3f} | {v['vs_fp32']:.2f} | {max(v['first_step_s']):.1f} |"
            for k, v in levers.items()
        ]
    if mem and "growth_over_fit_start_mib" in mem:
        lines += ["", "Peak RSS growth during fit, over the RSS at fit start (models, optimizer and data loaded):", ""]
        lines += ["| run | MiB |", "|---|---:|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in mem["growth_over_fit_start_mib"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render bench.json (scripts/bench.py --out) as docs/PERFORMANCE.md's table."
    )
    parser.add_argument("bench_json")
    args = parser.parse_args(argv)
    print(table(json.loads(Path(args.bench_json).read_text())))
    return 0

"""The first-GPU check (`scripts/gpu_check.sh`): our training step on the card, then a 300-step quickstart,
all in one JSON. Sized for < 8 minutes on an H100/H200-class card (docs/PERFORMANCE.md#gpu).

    python -m gist.analysis.gpu_check --out gpu_check.json          # on a CUDA machine
    python -m gist.analysis.gpu_check --device cpu --student ... --steps 3 --quickstart-steps 2   # the tests

1. `machine`: card, compute capability, CUDA and torch versions, the card's dense bf16 peak from its
   datasheet (DENSE_BF16_TFLOPS) and the measured throughput of a large bf16 matmul.
2. `steps`: the cached-guide GIST step (MiniLM student, mpnet guide embeddings from the cache, the bench's
   pairs) at the recipe's batch (16) and at a GPU-sized batch, in fp32 and bf16-mixed, with SDPA or eager
   attention (flash_attention_2 when the flash-attn package is installed), buckets of 8 texts, a token
   budget, none, or padding-free packing (model.packing; its attention in one group or in groups of 8;
   FlashAttention's varlen kernel when there is no attention dropout): step time, samples/s and MFU = model FLOPs per step / step time / dense bf16 peak
   (the FLOPs as `make bench`'s flop_bound counts them: unpadded tokens, forward + backward).
3. `quickstart`: `scripts/train.py experiment=quickstart` for 300 steps in bf16-mixed (mining, guide cache,
   training, export, the six-task comparison): wall time, final validation, the comparison rows.

Without CUDA (and no `--device cpu`) the CUDA parts are skipped with a message, and the JSON says so.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gist.analysis.bench import MINILM, MPNET, OFFLINE_DEFAULTS, ROOT, bench_pairs, ours_step_time
from gist.analysis.bench_machine import cpu_info, encoder_flops_per_text, matmul_peak_gflops, mean_tokens
from gist.infra.allocator import keep_freed_memory

# Dense (no structured sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by the words of
# torch.cuda.get_device_name(); the first match wins (so "H100 PCIe" before "H100").
DENSE_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
)
SKIP_MESSAGE = (
    "no CUDA device (torch.cuda.is_available() is False): skipping the GPU step benchmarks (bf16, SDPA / eager / "
    "FlashAttention, token-budget buckets, padding-free packing, MFU) and the 300-step quickstart; run scripts/gpu_check.sh on a CUDA "
    "machine (pass --device cpu to run the same code on this CPU)"
)


def datasheet_peak_tflops(name: str) -> float | None:
    return next((peak for words, peak in DENSE_BF16_TFLOPS if words in name), None)


def machine(device: str) -> dict:
    info = {"torch": torch.__version__, "device": device, **cpu_info()}
    if device == "cuda":
        name = torch.cuda.get_device_name()
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        t, reps = time.perf_counter(), 20
        for _ in range(reps):
            a @ a
        torch.cuda.synchronize()
        info |= {
            "cuda": name,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "cuda_version": torch.version.cuda,
            "datasheet_dense_bf16_tflops": datasheet_peak_tflops(name),
            "measured_bf16_matmul_tflops": 2 * 8192**3 * reps / (time.perf_counter() - t) / 1e12,
        }
    else:
        info |= {
            "cuda": None,
            "measured_bf16_matmul_tflops": matmul_peak_gflops(torch.bfloat16, reps=2) / 1e3,
            "measured_fp32_matmul_tflops": matmul_peak_gflops(torch.float32, reps=2) / 1e3,
        }
    return info


def step_configs(batch: int, big_batch: int, device: str) -> list[dict]:
    """The step settings to time: (batch, precision, attention, buckets or padding-free packing)."""
    attns = ["sdpa", "eager"] + (
        ["flash_attention_2"] if device == "cuda" and importlib.util.find_spec("flash_attn") else []
    )
    bf16 = dict(precision="bf16-mixed", attn="sdpa", bucket_size=None, bucket_tokens=None, packing=False)
    configs = [dict(bf16, batch=batch, precision="32-true", bucket_size=8)]
    for b in dict.fromkeys([batch, big_batch]):
        configs += [dict(bf16, batch=b, attn=a, bucket_size=8) for a in attns]
        configs += [dict(bf16, batch=b), dict(bf16, batch=b, bucket_tokens=4096)]
        configs += [dict(bf16, batch=b, packing=True), dict(bf16, batch=b, packing=True, bucket_size=8)]
    return configs


def time_steps(args, device: str, peak_tflops: float | None) -> list[dict]:
    rows = []
    pairs = bench_pairs(max(args.batch, args.big_batch) * args.steps)
    texts = [t for pair in pairs for t in pair]
    flops_per_pair = 2 * 3 * encoder_flops_per_text(args.student, mean_tokens(args.student, texts))
    with tempfile.TemporaryDirectory() as cache:
        for config in step_configs(args.batch, args.big_batch, device):
            b = config["batch"]
            step = ours_step_time(
                pairs[: b * args.steps],
                args.student,
                args.guide,
                b,
                args.steps,
                args.warmup,
                precision=config["precision"],
                cache_dir=cache,
                bucket_size=config["bucket_size"],
                bucket_tokens=config["bucket_tokens"],
                attn_implementation=config["attn"],
                packing=config["packing"],
            )
            flops = flops_per_pair * b
            row = {**config, "step_s": step, "samples_per_s": b / step, "model_tflops_per_s": flops / step / 1e12}
            row["mfu"] = row["model_tflops_per_s"] / peak_tflops if peak_tflops else None
            rows.append(row)
            mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
            print(
                f"step batch {b} {config['precision']} attn={config['attn']} bucket_size={config['bucket_size']} "
                f"bucket_tokens={config['bucket_tokens']} packing={config['packing']}: {step * 1e3:.1f} ms, {b / step:.0f} pairs/s{mfu}",
                flush=True,
            )
    return rows


def quickstart(steps: int, precision: str, overrides: list[str]) -> dict:
    """scripts/train.py experiment=quickstart for `steps` steps in a child process; its results."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "experiment=quickstart",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            f"trainer.precision={precision}",
            "logger=csv",
            f"hydra.run.dir={run}",
            *overrides,
        ]
        env = {**OFFLINE_DEFAULTS, **os.environ, "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        result = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": wall}
        if proc.returncode != 0:
            return result | {"output_tail": (proc.stdout + proc.stderr)[-3000:]}
        metrics = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
        vals = [float(r["val/stsb_spearman"]) for r in metrics if r.get("val/stsb_spearman")]
        comparison = run / "eval" / "comparison.json"
        return result | {
            "steps": steps,
            "final_val_stsb_spearman": vals[-1] if vals else None,
            "comparison": json.loads(comparison.read_text()) if comparison.is_file() else None,
        }


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # as training does (gist.train.run): ours and sentence-transformers alike
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: run the GPU parts on CPU")
    parser.add_argument("--student", default=MINILM)
    parser.add_argument("--guide", default=MPNET)
    parser.add_argument("--batch", type=int, default=16, help="the recipe's batch (pairs)")
    parser.add_argument("--big-batch", type=int, default=256, help="a GPU-sized batch (pairs)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quickstart-steps", type=int, default=300)
    parser.add_argument("--quickstart-overrides", nargs="*", default=[], help="extra train.py overrides")
    args = parser.parse_args(argv)

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu"
    result: dict = {"machine": machine(device)}
    if args.device == "auto" and device != "cuda":
        print(SKIP_MESSAGE, flush=True)
        result["skipped"] = SKIP_MESSAGE
    else:
        # The card's datasheet bf16 peak; on a CPU the faster of its measured matmuls (without bf16 units, a
        # bf16 matmul is slower than fp32 and the MFU against it would exceed 1).
        m = result["machine"]
        peak = m.get("datasheet_dense_bf16_tflops") or max(
            m["measured_bf16_matmul_tflops"], m.get("measured_fp32_matmul_tflops", 0.0)
        )
        result["mfu_peak_tflops"] = peak
        result["steps"] = time_steps(args, device, peak)
        precision = "bf16-mixed" if device == "cuda" else "32-true"
        result["quickstart"] = quickstart(args.quickstart_steps, precision, args.quickstart_overrides)
        print(f"quickstart: {json.dumps({k: v for k, v in result['quickstart'].items() if k != 'comparison'})}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if result.get("quickstart", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

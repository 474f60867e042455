"""Benchmark our GIST training step against sentence-transformers' trainer + GISTEmbedLoss (`make bench`).

    from gist.analysis.bench import bench_pairs, ours_step_time, st_step_time
    pairs = bench_pairs(64)
    ours = ours_step_time(pairs, MINILM, MPNET, batch=16, steps=14, warmup=4, cache_dir=".cache/guide")

`main` is scripts/bench.py's command line (its options are documented there). One process, same pairs,
models, guide and batch for both sides; warm-up steps excluded; the median step time of each repeat,
then the median over repeats. Keys (see docs/PERFORMANCE.md and KEYS; `--keys` picks some). The peak
memory runs are fresh processes of this module (`python -m gist.analysis.bench --memory-child ...`);
the machine, FLOP accounting and the decoder student are in gist/analysis/bench_machine.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gist.analysis.bench_machine import (
    bench_decoder,
    cpu_info,
    encoder_flops_per_text,
    matmul_peak_gflops,
    mean_tokens,
    status_mib,
)
from gist.infra.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
LORA = {"r": 16, "alpha": 32}  # every linear layer (peft's "all-linear")
KEYS = ("same_work_fp32", "mpnet_guide", "decoder_fp32", "gradcache_memory", "lora_memory", "flop_bound", "levers")


def bench_pairs(n: int) -> list[tuple[str, str]]:
    """(anchor, positive) pairs of same-label Emotion train texts (~25 tokens each), fixed order."""
    rows = [json.loads(line) for line in (ROOT / "data/mteb/EmotionClassification/train.jsonl").open()][: 4 * n]
    by_label: dict[int, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r["text"])
    pairs = [(t, texts[(i + 1) % len(texts)]) for texts in by_label.values() for i, t in enumerate(texts)]
    return pairs[:n]


def _median_step(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


# ---- sentence-transformers ------------------------------------------------------------------------


def st_step_time(pairs, student: str, guide: str, batch: int, steps: int, warmup: int, bf16: bool = False) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss
    from transformers import TrainerCallback

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    model = SentenceTransformer(student, device="cpu")
    guide_model = SentenceTransformer(guide, device="cpu")
    data = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=2e-5,
            report_to="none",
            use_cpu=True,
            dataloader_drop_last=True,
            save_strategy="no",
            logging_steps=10_000,
            bf16=bf16,
            seed=0,
            disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data, loss=GISTEmbedLoss(model, guide_model), callbacks=[Timer()]
        )
        trainer.train()
    return _median_step(times, warmup)


# ---- ours -----------------------------------------------------------------------------------------


def ours_step_time(
    pairs,
    student: str,
    guide: str,
    batch: int,
    steps: int,
    warmup: int,
    precision: str = "32-true",
    cache_dir: str | None = None,
    mini_batch_size: int | None = None,
    bucket_size: int | None = None,
    callbacks: list | None = None,
    lora: dict | None = None,
    bucket_tokens: int | None = None,
    attn_implementation: str | None = None,
    packing: bool = True,
) -> float:
    from lightning.pytorch import Callback, Trainer

    from gist.core.encoder import Encoder
    from gist.core.guide_cache import GuideCache
    from gist.core.loss_modules import GISTLoss
    from gist.core.module import GISTModule
    from gist.data.datamodule import GISTDataModule

    times: list[float] = []

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_text("".join(json.dumps({"query": a, "pos": p, "task_name": "bench"}) + "\n" for a, p in pairs))
        student_enc = Encoder(student, lora=lora, attn_implementation=attn_implementation, packing=packing)
        guide_enc = Encoder(guide, attn_implementation=attn_implementation)
        cache = GuideCache.for_encoder(cache_dir, guide_enc) if cache_dir else None
        module = GISTModule(
            student_enc,
            GISTLoss(mini_batch_size=mini_batch_size),
            guide_enc,
            lr=2e-5,
            guide_cache=cache,
            bucket_size=bucket_size,
            bucket_tokens=bucket_tokens,
        )
        dm = GISTDataModule(train_files=[str(path)], batch_size=batch, shuffle_buffer=1)
        dm.configure_encoders(student_enc, guide_enc, guide_cache=cache, prefill_guide_cache=cache is not None)
        trainer = Trainer(
            accelerator="auto",
            devices=1,
            precision=precision,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=1.0,
            callbacks=[Timer(), *(callbacks or [])],
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=dm)
    return _median_step(times, warmup)


def compare(name: str, batch: int, ours: list[float], st: list[float], **extra) -> dict:
    o, s = statistics.median(ours), statistics.median(st)
    result = {
        "ours_pairs_per_s": batch / o,
        "st_pairs_per_s": batch / s,
        "ratio": s / o,
        "ours_step_s": o,
        "st_step_s": s,
        "ours_repeats_s": ours,
        "st_repeats_s": st,
        **extra,
    }
    print(
        f"{name}: ours {batch / o:.1f} pairs/s, sentence-transformers {batch / s:.1f} pairs/s, ratio {s / o:.2f}",
        flush=True,
    )
    return result


# ---- memory and FLOPs -----------------------------------------------------------------------------


def memory_child(kind: str, batch: int, mini: int) -> None:
    """Run two training steps in this (fresh) process; print the RSS when fit starts (models,
    optimizer, data loaded) and the peak RSS during fit, in MiB. The peak is reset at fit start
    (Linux /proc/self/clear_refs), so loading, which peaks the same for any batch, is not counted."""
    from lightning.pytorch import Callback

    probe: dict[str, float] = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
            probe["start_rss_mib"] = status_mib("VmRSS")

        def on_train_end(self, trainer, pl_module):
            probe["peak_rss_mib"] = status_mib("VmHWM")

    pairs = bench_pairs(batch * 2)
    ours_step_time(
        pairs,
        MINILM,
        MINILM,
        batch,
        steps=2,
        warmup=0,
        bucket_size=8,
        mini_batch_size=mini if kind == "gradcache" else None,
        callbacks=[Probe()],
        lora=LORA if kind == "lora" else None,
    )
    print(json.dumps(probe))


def peak_rss(kind: str, batch: int, mini: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "gist.analysis.bench", "--memory-child", kind, str(batch), str(mini)],
        check=True,
        capture_output=True,
        text=True,
        env={
            **OFFLINE_DEFAULTS,
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def mpnet_guide_keys(result: dict, pairs, B: int, steps: int, warm: int, bs, reps) -> None:
    """mpnet_guide_fp32, then the cached-guide step (MiniLM student, mpnet guide from the cache) in fp32 and
    bf16, with length buckets (mpnet_guide_cached_fp32 / _bf16) and padding-free (..._packed)."""
    result["mpnet_guide_fp32"] = compare(
        "mpnet_guide_fp32",
        B,
        [ours_step_time(pairs, MINILM, MPNET, B, steps, warm, bucket_size=bs) for _ in reps],
        [st_step_time(pairs, MINILM, MPNET, B, steps, warm) for _ in reps],
    )
    st_mpnet = result["mpnet_guide_fp32"]["st_repeats_s"]
    best_st, st_bf16 = min(st_mpnet), None
    if torch.cuda.is_available():
        st_bf16 = [st_step_time(pairs, MINILM, MPNET, B, steps, warm, bf16=True) for _ in reps]
        best_st = min(best_st, statistics.median(st_bf16))
    # bf16: the full run where the hardware has bf16 units (AMX / AVX-512-BF16, or CUDA); elsewhere a few
    # steps (~20x slower than fp32 there; the number says so).
    fast = torch.cuda.is_available() or cpu_info().get("bf16_units", False)
    n16, w16, reps16 = (steps, warm, reps) if fast else (4, 1, range(1))
    for suffix, grouping in (("", {"packing": False}), ("_packed", {"packing": True})):  # buckets: attention only
        with tempfile.TemporaryDirectory() as cache:
            cached32 = [
                ours_step_time(pairs, MINILM, MPNET, B, steps, warm, cache_dir=cache, bucket_size=bs, **grouping)
                for _ in reps
            ]
            result[f"mpnet_guide_cached_fp32{suffix}"] = compare(
                f"mpnet_guide_cached_fp32{suffix}", B, cached32, st_mpnet
            )
            cached16 = [
                ours_step_time(
                    pairs[: B * n16],
                    MINILM,
                    MPNET,
                    B,
                    n16,
                    w16,
                    precision="bf16-mixed",
                    cache_dir=cache,
                    bucket_size=bs,
                    **grouping,
                )
                for _ in reps16
            ]
        result[f"mpnet_guide_cached_bf16{suffix}"] = compare(
            f"mpnet_guide_cached_bf16{suffix}",
            B,
            cached16,
            [best_st],
            st_setting="fp32" if st_bf16 is None or best_st < statistics.median(st_bf16) else "bf16",
            bf16_over_fp32=statistics.median(cached16) / statistics.median(cached32),
        )


PRECISIONS = ("fp32", "bf16")


def flop_bound_key(result: dict, pairs, B: int) -> None:
    """flop_bound: the cached-guide step at this machine's best precision (the fastest of the fp32 and bf16
    steps, bucketed or packed) against its FLOPs at that precision's matmul peak."""
    texts = [t for pair in pairs for t in pair]
    tokens = mean_tokens(MINILM, texts)
    student_fwd = encoder_flops_per_text(MINILM, tokens)
    flops = 2 * B * 3 * student_fwd  # anchors + positives; forward + backward = 3 forwards
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16, reps=2)}
    cached = {k: v["ours_step_s"] for k, v in result.items() if k.startswith("mpnet_guide_cached_")}
    fastest = {
        p: min((k for k in cached if k.startswith(f"mpnet_guide_cached_{p}")), key=cached.get) for p in PRECISIONS
    }
    steps = {p: cached[key] for p, key in fastest.items()}
    precision = min(steps, key=steps.get)
    peak, step = peaks[precision], steps[precision]
    bound = flops / (peak * 1e9)
    result["flop_bound"] = {
        "precision": precision,
        "config": f"{fastest[precision]} (student only: the guide is cached; the fastest setting)",
        "mean_tokens": tokens,
        "flops_per_step": flops,
        "matmul_peak_gflops": peak,
        "fp32_matmul_peak_gflops": peaks["fp32"],
        "bf16_matmul_peak_gflops": peaks["bf16"],
        "steps_s": steps,
        "bound_s": bound,
        "step_s": step,
        "step_over_bound": step / bound,
    }
    print(
        f"flop_bound: {flops / 1e9:.1f} GFLOP/step at {peak:.0f} GFLOP/s -> {bound:.2f} s; step {step:.2f} s ({step / bound:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # as training does (gist.train.run): ours and sentence-transformers alike
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--steps", type=int, default=14, help="steps per timed run (fp32)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--bucket-size", type=int, default=8, help="ours: length-bucketed encoding (0: one forward per block)"
    )
    parser.add_argument("--keys", default="", help=f"comma-separated subset of {','.join(KEYS)} (default: all)")
    parser.add_argument("--compile", action="store_true", help="levers: also time torch.compile (minutes each)")
    parser.add_argument("--memory-child", nargs=3, metavar=("KIND", "BATCH", "MINI"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        kind, batch, mini = args.memory_child
        memory_child(kind, int(batch), int(mini))
        return 0

    torch.manual_seed(0)
    B, steps, warm, bs = args.batch, args.steps, args.warmup, args.bucket_size or None
    pairs = bench_pairs(B * steps)
    result: dict = {
        "machine": {
            **cpu_info(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "batch_pairs": B,
            "steps": steps,
            "warmup": warm,
            "repeats": args.repeats,
            "bucket_size": bs,
            "packing": "student packs (model.packing), except the mpnet_guide_cached_* rows without _packed",
        }
    }
    reps = range(args.repeats)
    keys = set(args.keys.split(",")) if args.keys else set(KEYS)
    unknown = keys - set(KEYS)
    if unknown:
        parser.error(f"unknown keys {sorted(unknown)}; known: {', '.join(KEYS)}")
    if "same_work_fp32" in keys:
        per_block = [ours_step_time(pairs, MINILM, MINILM, B, steps, warm, packing=False) for _ in reps]
        result["same_work_fp32"] = compare(
            "same_work_fp32",
            B,
            [ours_step_time(pairs, MINILM, MINILM, B, steps, warm, bucket_size=bs) for _ in reps],
            [st_step_time(pairs, MINILM, MINILM, B, steps, warm) for _ in reps],
            ours_per_block_pairs_per_s=B / statistics.median(per_block),
            ours_per_block_repeats_s=per_block,
        )
    if "decoder_fp32" in keys:
        with tempfile.TemporaryDirectory() as tmp:
            decoder = str(bench_decoder(Path(tmp) / "decoder"))
            result["decoder_fp32"] = compare(
                "decoder_fp32",
                B,
                [ours_step_time(pairs, decoder, MINILM, B, steps, warm, bucket_size=bs) for _ in reps],
                [st_step_time(pairs, decoder, MINILM, B, steps, warm) for _ in reps],
                student="random Qwen3-style decoder, 6 x 384, last-token pooling, left padding; guide all-MiniLM-L6-v2",
            )
    if "mpnet_guide" in keys or "flop_bound" in keys:
        mpnet_guide_keys(result, pairs, B, steps, warm, bs, reps)
    mini = 32
    if "gradcache_memory" in keys:
        runs = {
            f"{kind}_{b}": peak_rss(kind, b, mini)
            for kind, b in [("plain", 64), ("plain", 256), ("gradcache", 64), ("gradcache", 256), ("gradcache", 1024)]
        }
        plain, cached = runs["plain_64"]["peak_rss_mib"], runs["gradcache_1024"]["peak_rss_mib"]
        result["gradcache_memory"] = {
            "plain_batch": 64,
            "plain_peak_rss_mib": plain,
            "gradcache_batch": 1024,
            "mini_batch_size": mini,
            "gradcache_peak_rss_mib": cached,
            "ratio": cached / plain,
            "growth_over_fit_start_mib": {k: v["peak_rss_mib"] - v["start_rss_mib"] for k, v in runs.items()},
            "runs": runs,
        }
        print(
            f"gradcache_memory: plain 64 {plain:.0f} MiB, GradCache 1024 {cached:.0f} MiB, ratio {cached / plain:.2f}; "
            + ", ".join(f"{k} +{v['peak_rss_mib'] - v['start_rss_mib']:.0f}" for k, v in runs.items())
        )
    if "lora_memory" in keys:
        full, lora = peak_rss("plain", 64, mini), peak_rss("lora", 64, mini)
        result["lora_memory"] = {
            "batch": 64,
            "lora": LORA,
            "full_peak_rss_mib": full["peak_rss_mib"],
            "lora_peak_rss_mib": lora["peak_rss_mib"],
            "full_growth_over_fit_start_mib": full["peak_rss_mib"] - full["start_rss_mib"],
            "lora_growth_over_fit_start_mib": lora["peak_rss_mib"] - lora["start_rss_mib"],
            "runs": {"full": full, "lora": lora},
        }
        print(
            f"lora_memory (MiniLM student and guide, batch 64): full fine-tuning peak {full['peak_rss_mib']:.0f} MiB, "
            f"LoRA r={LORA['r']} {lora['peak_rss_mib']:.0f} MiB"
        )
    if "flop_bound" in keys:
        flop_bound_key(result, pairs, B)
    if "levers" in keys:
        from gist.analysis.bench_levers import levers_key

        result["levers"] = levers_key(pairs, B, steps, warm, args.repeats, compile_model=args.compile)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `levers` key of `make bench`: the cached-guide step (MiniLM student, mpnet guide from the cache, the
bench's pairs) under each speed setting of issue #15, one fit per setting and repeat, s/step.

    python scripts/bench.py --keys levers --out levers.json                # ~5 min on 2 cores
    python scripts/bench.py --keys levers --compile --out levers.json      # + torch.compile (minutes each)

Settings: precision (fp32, bf16-mixed, and bf16-true: bf16 weights without an fp32 master copy, which
loses small AdamW updates, so a bound for a master-weight optimizer, not a training setting), attention
kernel (sdpa, eager), buckets of 8 texts, a token budget, or padding-free packing (model.packing; its
attention in the buckets' length groups, or in one group). `--compile` adds `torch.compile(dynamic=True)`
of the student's transformer; its compile time is the first step's time, reported apart.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from gist.analysis.bench import MINILM, MPNET, ours_step_time

SETTINGS = {
    "fp32": {},
    "fp32_eager": {"attn_implementation": "eager"},
    "fp32_tokens512": {"bucket_size": None, "bucket_tokens": 512},
    "fp32_packed": {"packing": True},
    "bf16": {"precision": "bf16-mixed"},
    "bf16_eager": {"precision": "bf16-mixed", "attn_implementation": "eager"},
    "bf16_tokens512": {"precision": "bf16-mixed", "bucket_size": None, "bucket_tokens": 512},
    "bf16_packed": {"precision": "bf16-mixed", "packing": True},
    "bf16_packed_one_attention_group": {"precision": "bf16-mixed", "packing": True, "bucket_size": None},
    "bf16_true_bound": {"precision": "bf16-true"},
    "bf16_true_eager_bound": {"precision": "bf16-true", "attn_implementation": "eager"},
}
COMPILED = {"fp32_compile": {}, "bf16_compile": {"precision": "bf16-mixed"}}


def _step_times(compile_model: bool):
    from lightning.pytorch import Callback

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_fit_start(self, trainer, pl_module):
            if compile_model:
                pl_module.student.model.compile(dynamic=True)

        def on_train_batch_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self.t)

    return StepTimes()


def levers_key(
    pairs, B: int, steps: int, warm: int, repeats: int, compile_model: bool = False, student=MINILM, guide=MPNET
) -> dict:
    """{setting: {"step_s": median over repeats of each fit's median step, "repeats_s": [...],
    "first_step_s": [...]}, ...}; relative to the fp32 setting as "vs_fp32"."""
    settings = {**SETTINGS, **(COMPILED if compile_model else {})}
    out: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, options in settings.items():
            kwargs = {"bucket_size": 8, "packing": False, **options}
            runs, first = [], []
            for _ in range(repeats):
                probe = _step_times(name in COMPILED)
                runs.append(
                    ours_step_time(pairs, student, guide, B, steps, warm, cache_dir=cache, callbacks=[probe], **kwargs)
                )
                first.append(probe.times[0])
            out[name] = {"step_s": statistics.median(runs), "repeats_s": runs, "first_step_s": first, **options}
            print(f"levers {name}: {out[name]['step_s']:.3f} s/step (first step {max(first):.1f} s)", flush=True)
    for row in out.values():
        row["vs_fp32"] = row["step_s"] / out["fp32"]["step_s"]
    return out

"""Where our training step's time goes: `torch.profiler` over the steps of `make bench`'s cached-guide
setting (MiniLM student, mpnet guide embeddings from the cache, the bench's pairs), as the markdown table of
docs/PERFORMANCE.md, with the host syncs per step (`aten::_local_scalar_dense` called from Python: `.item()`,
`bool(t)`, `.tolist()`; nearly free on a CPU, a pipeline stall on a GPU).

    python scripts/profile_step.py --precision bf16-mixed --steps 8     # table on stdout
    python scripts/profile_step.py --out profile.json                   # and the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from gist.analysis.bench import MINILM, MPNET, OFFLINE_DEFAULTS, bench_pairs, ours_step_time
from gist.analysis.bench_machine import cpu_info
from gist.infra.allocator import keep_freed_memory

SYNC_OP = "aten::_local_scalar_dense"


def profile_rows(
    student: str = MINILM,
    guide: str = MPNET,
    batch: int = 16,
    steps: int = 8,
    warmup: int = 3,
    precision: str = "32-true",
    bucket_size: int | None = 8,
    bucket_tokens: int | None = None,
    attn_implementation: str | None = None,
    packing: bool = True,
) -> dict:
    """Profile steps warmup..steps-1 of a fit; per op: self time per step (CPU, and CUDA when present), share
    of the total, calls per step. Also the median step time of the same steps (profiler overhead included)."""
    from lightning.pytorch import Callback
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    holder: dict = {}

    class Profile(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                holder["prof"] = profile(activities=activities)
                holder["prof"].__enter__()

        def on_train_end(self, trainer, pl_module):
            if cuda:
                torch.cuda.synchronize()
            holder["prof"].__exit__(None, None, None)

    pairs = bench_pairs(batch * steps)
    with tempfile.TemporaryDirectory() as cache:
        step_s = ours_step_time(
            pairs,
            student,
            guide,
            batch,
            steps,
            warmup,
            precision=precision,
            cache_dir=cache,
            bucket_size=bucket_size,
            bucket_tokens=bucket_tokens,
            attn_implementation=attn_implementation,
            packing=packing,
            callbacks=[Profile()],
        )
    n = steps - warmup
    events = [e for e in holder["prof"].key_averages() if not e.key.startswith(("ProfilerStep", "Optimizer.step"))]
    # Self times add up to the profiled wall time (each microsecond belongs to exactly one op or to Python).
    device_time = "self_device_time_total" if cuda else None
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [
        {
            "op": e.key,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n,
            "share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / n,
            **({"self_cuda_ms_per_step": getattr(e, device_time, 0) / 1e3 / n} if cuda else {}),
        }
        for e in events
    ]
    rows.sort(key=lambda r: -r.get("self_cuda_ms_per_step", r["self_cpu_ms_per_step"]))
    syncs = host_syncs(holder["prof"].events())
    return {
        "machine": {**cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "setting": dict(
            batch=batch, precision=precision, bucket_size=bucket_size, bucket_tokens=bucket_tokens, packing=packing
        ),
        "profiled_steps": n,
        "step_s": step_s,
        "host_syncs_per_step": sum(syncs.values()) / n,
        "host_syncs_by_caller": {k: v / n for k, v in syncs.most_common()},
        "rows": rows,
    }


def host_syncs(events) -> Counter:
    """Reads of a tensor's value by the host (`aten::_local_scalar_dense` under `.item()`, `bool(t)`,
    `.tolist()`) made from Python, by the nearest profiler range or op around them. A read inside another op's
    kernel (the CPU fused AdamW reads each parameter's step count) is not a host sync and is left out."""
    quiet = {SYNC_OP, "aten::item", "aten::is_nonzero"}
    syncs: Counter = Counter()
    for event in events:
        if event.name != SYNC_OP:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name in quiet:
            parent = parent.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            syncs[parent.name if parent is not None else "(top level)"] += 1
    return syncs


def table(result: dict, limit: int = 20) -> str:
    cuda = any("self_cuda_ms_per_step" in r for r in result["rows"])
    head = "| op | self CPU ms/step | share | calls/step |" + (" self CUDA ms/step |" if cuda else "")
    lines = [head, "|---|---:|---:|---:|" + ("---:|" if cuda else "")]
    for r in result["rows"][:limit]:
        line = f"| `{r['op']}` | {r['self_cpu_ms_per_step']:.1f} | {r['share']:.1%} | {r['calls_per_step']:.0f} |"
        lines.append(line + (f" {r['self_cuda_ms_per_step']:.1f} |" if cuda else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # as training does (gist.train.run): ours and sentence-transformers alike
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=MINILM)
    parser.add_argument("--guide", default=MPNET)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--bucket-size", type=int, default=8, help="0: none")
    parser.add_argument("--bucket-tokens", type=int, default=0, help="0: none")
    parser.add_argument("--attn", default=None, help="attn_implementation (default: transformers')")
    parser.add_argument(
        "--buckets", action="store_true", help="length buckets instead of packing (model.packing=false)"
    )
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    result = profile_rows(
        args.student,
        args.guide,
        args.batch,
        args.steps,
        args.warmup,
        args.precision,
        args.bucket_size or None,
        args.bucket_tokens or None,
        args.attn,
        not args.buckets,
    )
    m = result["machine"]
    print(f"{m['cpu']} ({', '.join(m['cpu_flags'])}), {m['threads']} threads, torch {m['torch']}; {result['setting']}")
    print(f"median step {result['step_s']:.3f} s (profiled); host syncs per step: {result['host_syncs_per_step']:.0f}")
    print(table(result, args.rows))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render docs/RESULTS.md from an ablation sweep's run folders (conf/sweep/ablation.yaml); logic in gist/ablation.py, gist/report.py.

    python scripts/results.py                                            # the newest logs/ablation/multiruns/*_ablation
    python scripts/results.py logs/ablation/multiruns/<time>_ablation --output docs/RESULTS.md
    python scripts/results.py <sweep> --allow-incomplete --output /tmp/partial.md   # while it runs

Every number in the output is read from the sweep's folders (eval/*.json, csv/metrics.csv, file times,
config.yaml), from data/mteb/reference_scores.json, or from `--masking` (scripts/guide_masking.py's
JSON, default docs/guide_masking.json). The prose of `--notes` (default
docs/RESULTS.notes.md) is inserted as written: it is the hand-written reading of the tables and must not
quote numbers, which would go stale on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gist import ablation as ab  # noqa: E402
from gist.report import results_markdown  # noqa: E402

def newest_sweep(log_dir: Path) -> Path:
    sweeps = sorted((log_dir / "ablation" / "multiruns").glob("*_ablation"))
    if not sweeps:
        raise SystemExit(f"error: no ablation sweep under {log_dir}/ablation/multiruns: run `python scripts/train.py -m sweep=ablation`")
    return sweeps[-1]


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
        mem = f", {mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores available{mem}, {gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", help="the multirun folder (default: the newest *_ablation sweep)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--notes", default=str(ROOT / "docs" / "RESULTS.notes.md"), help="hand-written reading ('' for none)")
    parser.add_argument("--reference", default=str(ROOT / "data" / "mteb" / "reference_scores.json"))
    parser.add_argument("--masking", default=str(ROOT / "docs" / "guide_masking.json"),
                        help="scripts/guide_masking.py --output JSON to include ('' for none)")
    parser.add_argument("--log-dir", default=str(ROOT / "logs"))
    parser.add_argument("--allow-incomplete", action="store_true", help="render the finished jobs of a running sweep")
    args = parser.parse_args(argv)

    sweep_dir = Path(args.sweep_dir).resolve() if args.sweep_dir else newest_sweep(Path(args.log_dir))
    try:
        jobs = ab.load_sweep(sweep_dir, allow_incomplete=args.allow_incomplete)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    reference = json.loads(Path(args.reference).read_text()) if args.reference and Path(args.reference).is_file() else {}
    notes = Path(args.notes).read_text() if args.notes and Path(args.notes).is_file() else None
    masking = json.loads(Path(args.masking).read_text()) if args.masking and Path(args.masking).is_file() else None
    shown = sweep_dir.relative_to(ROOT) if sweep_dir.is_relative_to(ROOT) else sweep_dir
    text = results_markdown(sweep_dir, jobs, reference, notes, hardware(), shown=str(shown), masking=masking)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"{args.output}: {len(jobs)} jobs of {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

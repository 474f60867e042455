"""docs/RESULTS.md from an ablation sweep's run folders (conf/sweep/ablation.yaml): what scripts/results.py runs.

    from gist.analysis.results import write_results
    write_results(sweep_dir, "docs/RESULTS.md", reference="data/mteb/reference_scores.json",
                  notes="docs/RESULTS.notes.md", masking="docs/guide_masking.json")

Every number in the output is read from the sweep's folders (eval/*.json, csv/metrics.csv, file times,
config.yaml), from the reference scores, or from `masking` (gist.analysis.masking's JSON). The prose of
`notes` is inserted as written: it is the hand-written reading of the tables and must not quote numbers,
which would go stale on a rerun. Aggregation in gist/analysis/ablation.py, rendering in gist/analysis/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from gist.analysis import ablation as ab
from gist.analysis.report import results_markdown, sweep_figures

ROOT = Path(__file__).resolve().parents[2]


def newest_sweep(log_dir: Path) -> Path:
    """The newest <log_dir>/ablation/multiruns/*_ablation folder (FileNotFoundError if there is none)."""
    sweeps = sorted((Path(log_dir) / "ablation" / "multiruns").glob("*_ablation"))
    if not sweeps:
        raise FileNotFoundError(
            f"no ablation sweep under {log_dir}/ablation/multiruns: run `python scripts/train.py -m sweep=ablation`"
        )
    return sweeps[-1]


def hardware() -> str:
    """One line: CPU model, cores available, RAM, GPU; torch version and threads, Python version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        mem_kb = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        mem = f", {mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        mem = ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores available{mem}, {gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def _json_or_none(path: str | Path | None):
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def write_results(
    sweep_dir: str | Path,
    output: str | Path,
    *,
    reference: str | Path | None = None,
    notes: str | Path | None = None,
    masking: str | Path | None = None,
    allow_incomplete: bool = False,
    hardware_line: str | None = None,
) -> list[ab.Job]:
    """Render RESULTS.md for `sweep_dir` into `output`; returns the jobs it read. `reference` (published
    scores JSON), `notes` (markdown) and `masking` (guide-masking JSON) are optional files: None or a
    missing file leaves that part out. Raises FileNotFoundError / ValueError (from
    gist.analysis.ablation.load_sweep) for a missing sweep, an unfinished job or inconsistent base scores."""
    sweep_dir = Path(sweep_dir).resolve()
    jobs = ab.load_sweep(sweep_dir, allow_incomplete=allow_incomplete)
    notes_text = Path(notes).read_text() if notes and Path(notes).is_file() else None
    shown = sweep_dir.relative_to(ROOT) if sweep_dir.is_relative_to(ROOT) else sweep_dir
    text = results_markdown(
        sweep_dir,
        jobs,
        _json_or_none(reference) or {},
        notes_text,
        hardware_line or hardware(),
        shown=str(shown),
        masking=_json_or_none(masking),
        # The notebook's charts of this sweep, when it has written them (notebooks/compare_checkpoints.ipynb).
        figures=sweep_figures(ROOT / "docs" / "figures", sweep_dir.name, Path(output).parent),
    )
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text)
    return jobs


def main(argv: list[str] | None = None) -> int:
    """The command line of scripts/results.py; exit status 1 (one `error:` line) for a sweep it cannot read."""
    parser = argparse.ArgumentParser(description="Render docs/RESULTS.md from an ablation sweep's run folders.")
    parser.add_argument("sweep_dir", nargs="?", help="the multirun folder (default: the newest *_ablation sweep)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "RESULTS.md"))
    parser.add_argument(
        "--notes", default=str(ROOT / "docs" / "RESULTS.notes.md"), help="hand-written reading ('' for none)"
    )
    parser.add_argument("--reference", default=str(ROOT / "data" / "mteb" / "reference_scores.json"))
    parser.add_argument(
        "--masking",
        default=str(ROOT / "docs" / "guide_masking.json"),
        help="scripts/guide_masking.py --output JSON to include ('' for none)",
    )
    parser.add_argument("--log-dir", default=str(ROOT / "logs"))
    parser.add_argument("--allow-incomplete", action="store_true", help="render the finished jobs of a running sweep")
    args = parser.parse_args(argv)
    try:
        sweep_dir = Path(args.sweep_dir) if args.sweep_dir else newest_sweep(Path(args.log_dir))
        jobs = write_results(
            sweep_dir,
            args.output,
            reference=args.reference,
            notes=args.notes,
            masking=args.masking,
            allow_incomplete=args.allow_incomplete,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.output}: {len(jobs)} jobs of {sweep_dir.resolve()}")
    return 0

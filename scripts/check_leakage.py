"""Report texts shared by training files (GIST schema) and evaluation splits; logic in gist/leakage.py.

    python scripts/check_leakage.py .cache/mined .cache/derived --data-dir data/mteb
    python scripts/check_leakage.py train.jsonl more.parquet --data-dir data/mteb --splits test validation
    python scripts/check_leakage.py .cache --data-dir data/mteb --fail-on-overlap --output leakage.json

Training inputs: .jsonl/.parquet files, or folders searched recursively for them. Evaluation side: the
eval split of every task folder under --data-dir (meta.json `eval_split`, default test), or --splits.
Exact = the same string; near = the same after normalisation (lower case, no punctuation, single
spaces). Exit status 1 with --fail-on-overlap when anything overlaps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gist.leakage import eval_texts, find_overlap, training_texts


def training_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix in (".jsonl", ".parquet") and p.is_file())
            if not found:
                sys.exit(f"{item}: no .jsonl or .parquet files")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            sys.exit(f"{item}: no such file or folder")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", nargs="+", help="training files or folders (GIST schema: query, pos, neg)")
    parser.add_argument("--data-dir", required=True, help="folder of task folders (e.g. data/mteb)")
    parser.add_argument("--tasks", nargs="*", default=None, help="task folder names (default: all)")
    parser.add_argument("--splits", nargs="*", default=None, help="splits to check (default: each task's eval split)")
    parser.add_argument("--examples", type=int, default=3, help="examples shown per split")
    parser.add_argument("--output", help="write the full report as JSON here")
    parser.add_argument("--fail-on-overlap", action="store_true", help="exit 1 if any text overlaps")
    args = parser.parse_args(argv)

    files = training_files(args.train)
    evals = eval_texts(args.data_dir, args.splits, args.tasks)
    report = find_overlap(training_texts(files), evals, max_examples=args.examples)

    print(f"{report.training_texts} training texts in {len(files)} files vs {len(evals)} evaluation splits")
    print("| split | eval texts | exact | near | training texts hitting it |\n|---|---:|---:|---:|---:|")
    for name, s in report.tasks.items():
        print(f"| {name} | {s.eval_texts} | {s.exact} | {s.near} | {s.training_rows} |")
    for name, s in report.tasks.items():
        for ex in s.examples:
            print(f"  {name}: {ex['eval_text']!r} ({ex['eval']})\n      train: {ex['train_text']!r} ({ex['train']})")
    if args.output:
        Path(args.output).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    verdict = "no overlap" if report.clean else f"OVERLAP: {report.total_exact} exact, {report.total_near} near"
    print(verdict)
    return 1 if args.fail_on_overlap and not report.clean else 0


if __name__ == "__main__":
    sys.exit(main())

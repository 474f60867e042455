"""Mine GIST classification triplets from MTEB-layout task folders (GIST_SPEC §3), train split only.

    python scripts/mine_triplets.py --task-dir data/mteb/Banking77Classification --out banking77.jsonl
    python scripts/mine_triplets.py --task-dir data/mteb/*Classification --out-dir mined/ \
        --guide sentence-transformers/all-MiniLM-L6-v2 --max-texts 2000

Output rows follow the GIST schema (query, pos, neg, task_name = mteb-<name>-avs_triplets, *_instruct,
symmetric). Deterministic for a given seed (default 1029, as GIST), guide and input.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from gist.mining import MinedTriplets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-dir", nargs="+", required=True, help="classification task folder(s) with train.jsonl")
    parser.add_argument("--out", help="output .jsonl (one task)")
    parser.add_argument("--out-dir", help="output folder: <task_name>.jsonl per task")
    parser.add_argument("--guide", default="sentence-transformers/all-mpnet-base-v2", help="hub id or local folder")
    parser.add_argument("--guide-revision", default=None)
    parser.add_argument("--guide-pooling", choices=["cls", "mean"], default=None, help="default: the model's config")
    parser.add_argument("--guide-max-length", type=int, default=None)
    parser.add_argument("--max-texts", type=int, default=None, help="seeded subsample per task (default: all)")
    parser.add_argument("--seed", type=int, default=1029)
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.out_dir) or (args.out and len(args.task_dir) != 1):
        parser.error("give --out with one --task-dir, or --out-dir")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    for task_dir in args.task_dir:
        miner = MinedTriplets(
            task_dir, guide=args.guide, guide_pooling=args.guide_pooling, guide_max_length=args.guide_max_length,
            guide_revision=args.guide_revision, max_texts=args.max_texts, seed=args.seed, split=args.split,
            batch_size=args.batch_size,
        )
        out = Path(args.out) if args.out else Path(args.out_dir) / f"{miner.task_name}.jsonl"
        with tempfile.TemporaryDirectory() as cache:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(miner.materialize(cache)), out)
        print(f"{miner.task_name}: {sum(1 for _ in out.open())} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

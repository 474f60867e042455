"""Report texts shared by training files (GIST schema) and evaluation splits; logic (and this command line) in gist/data/leakage.py.

    python scripts/check_leakage.py .cache/mined .cache/derived --data-dir data/mteb
    python scripts/check_leakage.py train.jsonl more.parquet --data-dir data/mteb --splits test validation
    python scripts/check_leakage.py .cache --data-dir data/mteb --fail-on-overlap --output leakage.json

Training inputs: .jsonl/.parquet files, or folders searched recursively for them. Evaluation side: the
eval split of every task folder under --data-dir (meta.json `eval_split`, default test), or --splits.
Exact = the same string; near = the same after normalisation (lower case, no punctuation, single
spaces). Exit status 1 with --fail-on-overlap when anything overlaps.
"""

from __future__ import annotations

import sys

from gist.data.leakage import main

if __name__ == "__main__":
    sys.exit(main())

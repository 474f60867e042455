"""Render the JSON of `make bench` (scripts/bench.py --out FILE) as the markdown table of docs/PERFORMANCE.md;
logic in gist/analysis/bench_table.py.

    python scripts/bench_table.py bench.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gist.analysis.bench_table import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""Render docs/RESULTS.md from an ablation sweep's run folders (conf/sweep/ablation.yaml); logic in
gist/analysis/results.py (over gist/analysis/ablation.py and gist/analysis/report.py).

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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gist.analysis.results import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

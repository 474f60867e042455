"""Benchmark our GIST training step against sentence-transformers' trainer + GISTEmbedLoss; logic in
gist/analysis/bench.py.

    python scripts/bench.py --out bench.json            # `make bench`
    python scripts/bench.py --out bench.json --steps 30 --repeats 3

One process, same pairs, models, guide and batch for both sides; warm-up steps excluded; the median
step time of each repeat, then the median over repeats. Keys (see docs/PERFORMANCE.md):
same_work_fp32, mpnet_guide_fp32, mpnet_guide_cached_fp32, mpnet_guide_cached_bf16, gradcache_memory,
flop_bound, machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gist.analysis.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

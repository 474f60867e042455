"""Where does the guide mask? Per training task, the share of in-batch candidates a guide vetoes, without
training; logic in gist/analysis/masking.py.

    python scripts/guide_masking.py                                   # mpnet and MiniLM guides, margins 0/0.05/0.1
    python scripts/guide_masking.py --guides sentence-transformers/all-mpnet-base-v2 --margins 0 --batches 500
    python scripts/guide_masking.py --files .cache/mined/*.jsonl --output masking.json

Columns: vetoes per anchor (masked candidates beyond the anchor's own anchor and positive in the aa/pp
blocks, which any guide masks: G_ii = 1 > sim(a, p)), masked fraction of the B x C logits, and effective
negatives (unmasked non-target candidates per anchor).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gist.analysis.masking import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

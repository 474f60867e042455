"""Mine GIST classification triplets from MTEB-layout task folders (GISTEmbed paper, arXiv:2402.16829; the dataset card of avsolatorio/medi-data-mteb_avs_triplets), train split only.

    python scripts/mine_triplets.py --task-dir data/mteb/Banking77Classification --out banking77.jsonl
    python scripts/mine_triplets.py --task-dir data/mteb/*Classification --out-dir mined/ \
        --guide sentence-transformers/all-MiniLM-L6-v2 --max-texts 2000

Output rows follow the GIST schema (query, pos, neg, task_name = mteb-<name>-avs_triplets, *_instruct,
symmetric). Deterministic for a given seed (default 1029, as GIST), guide and input. Logic (and this
command line) in gist/data/mining.py.
"""

from __future__ import annotations

import sys

from gist.infra.hub import offline_unless_reachable

offline_unless_reachable()  # before transformers / datasets read HF_HUB_OFFLINE: no minutes of silent retries

from gist.data.mining import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""Where does the guide mask? Per training task, the share of in-batch candidates a guide vetoes.

The GIST mask depends on the guide's embeddings only (never on the student's), so it can be measured
without training: draw random same-task batches from training files (the quickstart's mined triplets and
STSBenchmark pairs by default), look the texts up in the guide cache (embedding what is missing), and
call gist.losses.gist_loss with the guide's embeddings in the student's place: its masked fraction and
effective negatives are exactly those training would see for such a batch.

    python scripts/guide_masking.py                                   # mpnet and MiniLM guides, margins 0/0.05/0.1
    python scripts/guide_masking.py --guides sentence-transformers/all-mpnet-base-v2 --margins 0 --batches 500
    python scripts/guide_masking.py --files .cache/mined/*.jsonl --output masking.json

Columns: vetoes per anchor (masked candidates beyond the anchor's own anchor and positive in the aa/pp
blocks, which any guide masks: G_ii = 1 > sim(a, p)), masked fraction of the B x C logits, and effective
negatives (unmasked non-target candidates per anchor).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gist.data import text_id  # noqa: E402
from gist.encoder import Encoder  # noqa: E402
from gist.guide_cache import GuideCache  # noqa: E402
from gist.losses import gist_loss  # noqa: E402

GUIDES = ["sentence-transformers/all-mpnet-base-v2", "sentence-transformers/all-MiniLM-L6-v2"]


def read_rows(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                rows.append({"anchor": row["query"], "positive": row["pos"], "negative": row.get("neg") or None})
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise SystemExit(f"error: {path}:{n}: not a training row with query/pos ({err})") from err
    return rows


def task_of(path: Path) -> str:
    """`mteb-banking77-avs_triplets-<digest>.jsonl` -> `banking77`; `stsbenchmark-pairs-<digest>` -> `stsbenchmark-pairs`."""
    stem = path.stem.rsplit("-", 1)[0]
    return stem.removeprefix("mteb-").removesuffix("-avs_triplets")


def batch_embeddings(cache: GuideCache, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The guide's cached (anchor, positive, negative) embeddings of a batch; negative None for pairs."""
    def emb(texts: list[str]) -> torch.Tensor:
        return cache.lookup([text_id(t) for t in texts]).float()

    negative = emb([r["negative"] for r in batch]) if all(r["negative"] for r in batch) else None
    return emb([r["anchor"] for r in batch]), emb([r["positive"] for r in batch]), negative


def batch_stats(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None, margin: float) -> dict[str, float]:
    _, stats = gist_loss(anchor, positive, negative, guide_anchor=anchor, guide_positive=positive,
                         guide_negative=negative, margin=margin)
    C = float(stats["candidates"])
    vetoes = float(stats["masked_frac"]) * C - 2  # beyond the own anchor (aa) and own positive (pp)
    return {"vetoes_per_anchor": vetoes, "masked_frac": float(stats["masked_frac"]),
            "effective_negatives": float(stats["effective_negatives"]), "candidates": C}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="*", help="training jsonl files (default: .cache/mined/*.jsonl and .cache/derived/*.jsonl)")
    parser.add_argument("--guides", nargs="*", default=GUIDES)
    parser.add_argument("--margins", nargs="*", type=float, default=[0.0, 0.05, 0.1])
    parser.add_argument("--batches", type=int, default=200, help="random batches per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "guide"))
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    files = [Path(f) for f in args.files] if args.files else sorted([*(ROOT / ".cache" / "mined").glob("*.jsonl"), *(ROOT / ".cache" / "derived").glob("*.jsonl")])
    if not files:
        print("error: no training files: run `make train` (it mines them) or pass --files", file=sys.stderr)
        return 1
    data = {task_of(f): read_rows(f) for f in files}
    results = []
    for guide_name in args.guides:
        guide = Encoder(guide_name).eval()
        cache = GuideCache.for_encoder(args.cache_dir, guide)
        texts = [t for rows in data.values() for r in rows for t in (r["anchor"], r["positive"], r["negative"]) if t]
        computed = cache.fill(guide, texts)
        print(f"{guide_name}: {computed} texts embedded, the rest read from {cache.dir}", file=sys.stderr)
        for task, rows in data.items():
            rng = random.Random(args.seed)
            batches = [rng.sample(rows, args.batch_size) for _ in range(args.batches)] if len(rows) >= args.batch_size else [rows]
            embedded = [batch_embeddings(cache, batch) for batch in batches]  # looked up once, used for every margin
            for margin in args.margins:
                sums = defaultdict(float)
                for embeddings in embedded:
                    for key, value in batch_stats(*embeddings, margin).items():
                        sums[key] += value
                results.append({"guide": guide_name.rsplit("/", 1)[-1], "task": task, "margin": margin, "rows": len(rows),
                                **{k: v / len(batches) for k, v in sums.items()}})
    header = ["guide", "task", "margin", "rows", "vetoes_per_anchor", "masked_frac", "effective_negatives", "candidates"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        print("| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in header) + " |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

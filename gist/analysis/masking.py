"""Where does the guide mask? Per training task, the share of in-batch candidates a guide vetoes.

The GIST mask depends on the guide's embeddings only (never on the student's), so it can be measured
without training: draw random same-task batches from training files (the quickstart's mined triplets and
STSBenchmark pairs by default), look the texts up in the guide cache (embedding what is missing), and
call gist.core.losses.gist_loss with the guide's embeddings in the student's place: its masked fraction and
effective negatives are exactly those training would see for such a batch.

    from gist.analysis.masking import guide_masking
    rows = guide_masking(files, ["sentence-transformers/all-mpnet-base-v2"], margins=[0.0, 0.1], cache_dir=".cache/guide")

scripts/guide_masking.py is its command line. Per (guide, task, margin): vetoes per anchor (masked
candidates beyond the anchor's own anchor and positive in the aa/pp blocks, which any guide masks:
G_ii = 1 > sim(a, p)), masked fraction of the B x C logits, and effective negatives (unmasked non-target
candidates per anchor). gist.analysis.report.masking_table renders them for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

from gist.core.encoder import Encoder
from gist.core.guide_cache import GuideCache
from gist.core.losses import gist_loss
from gist.data.records import text_id

ROOT = Path(__file__).resolve().parents[2]
GUIDES = ["sentence-transformers/all-mpnet-base-v2", "sentence-transformers/all-MiniLM-L6-v2"]
COLUMNS = ["guide", "task", "margin", "rows", "vetoes_per_anchor", "masked_frac", "effective_negatives", "candidates"]


def read_rows(path: Path) -> list[dict]:
    """A training file's (anchor, positive, negative or None) rows; ValueError naming the file and line."""
    rows = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                rows.append({"anchor": row["query"], "positive": row["pos"], "negative": row.get("neg") or None})
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n}: not a training row with query/pos ({err})") from err
    return rows


def task_of(path: Path) -> str:
    """`mteb-banking77-avs_triplets-<digest>.jsonl` -> `banking77`; `stsbenchmark-pairs-<digest>` -> `stsbenchmark-pairs`."""
    stem = Path(path).stem.rsplit("-", 1)[0]
    return stem.removeprefix("mteb-").removesuffix("-avs_triplets")


def batch_embeddings(cache: GuideCache, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The guide's cached (anchor, positive, negative) embeddings of a batch; negative None for pairs."""

    def emb(texts: list[str]) -> torch.Tensor:
        return cache.lookup([text_id(t) for t in texts]).float()

    negative = emb([r["negative"] for r in batch]) if all(r["negative"] for r in batch) else None
    return emb([r["anchor"] for r in batch]), emb([r["positive"] for r in batch]), negative


def batch_stats(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None, margin: float
) -> dict[str, float]:
    _, stats = gist_loss(
        anchor, positive, negative, guide_anchor=anchor, guide_positive=positive, guide_negative=negative, margin=margin
    )
    C = float(stats["candidates"])
    vetoes = float(stats["masked_frac"]) * C - 2  # beyond the own anchor (aa) and own positive (pp)
    return {
        "vetoes_per_anchor": vetoes,
        "masked_frac": float(stats["masked_frac"]),
        "effective_negatives": float(stats["effective_negatives"]),
        "candidates": C,
    }


def default_files(root: Path = ROOT) -> list[Path]:
    """The quickstart's training files, once `make train` has mined them: .cache/mined and .cache/derived."""
    return sorted([*(root / ".cache" / "mined").glob("*.jsonl"), *(root / ".cache" / "derived").glob("*.jsonl")])


def guide_masking(
    files: list[str | Path],
    guides: list[str] = GUIDES,
    margins: list[float] = (0.0, 0.05, 0.1),
    batches: int = 200,
    batch_size: int = 16,
    seed: int = 0,
    cache_dir: str | Path = ROOT / ".cache" / "guide",
    log=None,
) -> list[dict]:
    """One row per (guide, task, margin), averaged over `batches` random same-task batches of
    `batch_size` rows (a task with fewer rows: one batch of all of them); the same batches for every
    guide and margin. Guide embeddings come from (and fill) the guide cache in `cache_dir`."""
    data = {task_of(Path(f)): read_rows(Path(f)) for f in files}
    results = []
    for guide_name in guides:
        guide = Encoder(guide_name).eval()
        cache = GuideCache.for_encoder(cache_dir, guide)
        texts = [t for rows in data.values() for r in rows for t in (r["anchor"], r["positive"], r["negative"]) if t]
        computed = cache.fill(guide, texts)
        if log is not None:
            log(f"{guide_name}: {computed} texts embedded, the rest read from {cache.dir}")
        for task, rows in data.items():
            rng = random.Random(seed)
            drawn = [rng.sample(rows, batch_size) for _ in range(batches)] if len(rows) >= batch_size else [rows]
            embedded = [batch_embeddings(cache, batch) for batch in drawn]  # looked up once, used for every margin
            for margin in margins:
                sums = defaultdict(float)
                for embeddings in embedded:
                    for key, value in batch_stats(*embeddings, margin).items():
                        sums[key] += value
                results.append(
                    {
                        "guide": guide_name.rsplit("/", 1)[-1],
                        "task": task,
                        "margin": margin,
                        "rows": len(rows),
                        **{k: v / len(drawn) for k, v in sums.items()},
                    }
                )
    return results


def markdown_rows(results: list[dict]) -> str:
    """Every column of every row (floats to 3 decimals), as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [
        "| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in COLUMNS) + " |"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The command line of scripts/guide_masking.py: the table on stdout, the rows as JSON with --output."""
    parser = argparse.ArgumentParser(description="Per training task, the share of in-batch candidates a guide vetoes.")
    parser.add_argument(
        "--files", nargs="*", help="training jsonl files (default: .cache/mined/*.jsonl and .cache/derived/*.jsonl)"
    )
    parser.add_argument("--guides", nargs="*", default=GUIDES)
    parser.add_argument("--margins", nargs="*", type=float, default=[0.0, 0.05, 0.1])
    parser.add_argument("--batches", type=int, default=200, help="random batches per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "guide"))
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    files = [Path(f) for f in args.files] if args.files else default_files()
    if not files:
        print("error: no training files: run `make train` (it mines them) or pass --files", file=sys.stderr)
        return 1
    try:
        results = guide_masking(
            files,
            args.guides,
            args.margins,
            args.batches,
            args.batch_size,
            args.seed,
            args.cache_dir,
            log=lambda line: print(line, file=sys.stderr),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown_rows(results), end="")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0

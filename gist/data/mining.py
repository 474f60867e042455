"""Training triplets derived from MTEB-layout task folders, cached on disk.

`MinedTriplets`: GIST's classification-triplet mining (GISTEmbed paper, arXiv:2402.16829, and its author's
scripts/create_classification_dataset.py), per task folder, train split only:
  1. embed every text with the guide (cosine);
  2. positive of text i = a sample from the 100 most similar texts of the SAME label (i excluded),
     with probability softmax(sim / 0.05);
  3. negative = uniform over the texts of all OTHER labels;
  4. drop singleton classes and rows with query == pos or query == neg.
Deterministic for a given seed (1029), guide and input. `task_name = mteb-<name>-avs_triplets`.

`StsPairs`: STS pairs with score >= min_score as a symmetric pair task (no hard negative).

Both take `exclude_eval_of` (a folder of task folders): texts that occur, after `gist.data.leakage.normalize`,
in any of its evaluation splits are dropped BEFORE mining, so no training row contains an evaluation
text. STSBenchmark reuses sentences across its splits (89 distinct test sentences are in its train pairs
with score >= 4) and a few classification texts recur across splits: see LOG.md.

Both write GIST-schema jsonl under a cache folder keyed by every argument that changes the output,
so a second run reuses the file. CLI: scripts/mine_triplets.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from gist.data.records import DataError, iter_records, read_sts

log = logging.getLogger(__name__)


def task_slug(folder_name: str) -> str:
    """MTEB task folder -> GIST's dataset name: Banking77Classification -> banking77,
    TweetSentimentExtractionClassification -> tweet_sentiment_extraction."""
    name = folder_name.removesuffix("Classification")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _key(**kwargs) -> str:
    return hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:12]


def _excluded(exclude_eval_of: str | None) -> tuple[frozenset[str], str | None]:
    """(normalised evaluation texts, their digest for cache keys); empty when nothing is excluded."""
    if exclude_eval_of is None:
        return frozenset(), None
    # Every derived source asks (for its cache key, then to filter): read the splits once per content.
    stamp = tuple(
        (str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(Path(exclude_eval_of).glob("*/*.json*"))
    )
    return _excluded_cached(str(exclude_eval_of), stamp)


@functools.lru_cache(maxsize=4)
def _excluded_cached(exclude_eval_of: str, stamp: tuple) -> tuple[frozenset[str], str]:
    from gist.data.leakage import eval_keys

    keys = frozenset(eval_keys(exclude_eval_of))
    return keys, hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]


def _file_digest(path: Path) -> str:
    """Content hash of an input file: the cache follows the data, not its path or mtime."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache entry


def read_classification(task_dir: str | Path, split: str = "train") -> tuple[list[str], list]:
    """(texts, labels) of a classification task folder, skipping empty/whitespace-only texts."""
    path = Path(task_dir) / f"{split}.jsonl"
    texts, labels = [], []
    for row_no, record in iter_records(path):
        if not isinstance(record, dict) or "text" not in record or "label" not in record:
            raise DataError(f"{path}: row {row_no}: a classification row needs 'text' and 'label'")
        if not isinstance(record["text"], str):
            raise DataError(f"{path}: row {row_no}: 'text' must be a string")
        if record["text"].strip():  # MTEB keeps empty texts (e.g. Tweet row 314); training must not
            texts.append(record["text"])
            labels.append(record["label"])
    return texts, labels


def mine_triplets(
    embeddings: torch.Tensor,
    texts: list[str],
    labels: list,
    *,
    seed: int = 1029,
    top_k: int = 100,
    temperature: float = 0.05,
) -> list[tuple[str, str, str]]:
    """GIST's mining over precomputed unit-norm embeddings (N, d). Returns (query, pos, neg) in input order."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray([str(label) for label in labels])
    classes, counts = np.unique(labels_arr, return_counts=True)
    keep = set(classes[counts >= 2])  # singleton classes have no positive
    emb = embeddings.float()
    rows = []
    for i in range(len(texts)):
        if labels_arr[i] not in keep:
            continue
        same = np.flatnonzero(labels_arr == labels_arr[i])
        same = same[same != i]
        other = np.flatnonzero(labels_arr != labels_arr[i])
        if len(other) == 0:
            continue
        sims = (emb[same] @ emb[i]).numpy()  # (n_same,)
        k = min(top_k, len(same))
        top = np.argpartition(-sims, k - 1)[:k] if k < len(same) else np.arange(len(same))
        top = top[np.lexsort((same[top], -sims[top]))]  # sorted by similarity, ties by index: deterministic
        logits = sims[top] / temperature
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        pos = same[top[rng.choice(len(top), p=probs)]]
        neg = other[rng.integers(len(other))]
        if texts[i] == texts[pos] or texts[i] == texts[neg]:
            continue
        rows.append((texts[i], texts[pos], texts[neg]))
    return rows


class MinedTriplets:
    """GIST-mined triplets of one MTEB classification task folder (train split), cached as jsonl.

    Args:
        task_dir: folder with `<split>.jsonl` rows {text, label}.
        guide: the encoder used for mining (hub id or local folder).
        guide_pooling / guide_max_length / guide_revision: as for `gist.core.encoder.Encoder`.
        max_texts: subsample this many texts (seeded) before mining; None = the whole split.
        seed: GIST uses 1029.
        name: dataset name in task_name; default derived from the folder (banking77, emotion, ...).
        batch_size: encoding batch size.
        guide_cache_dir: also store the mining embeddings in this guide-embedding cache
            (gist/core/guide_cache.py), so training with the same guide does not embed these texts again.
        exclude_eval_of: folder of task folders whose evaluation-split texts are removed before mining.
    """

    def __init__(
        self,
        task_dir: str,
        guide: str,
        guide_pooling: str | None = None,
        guide_max_length: int | None = None,
        guide_revision: str | None = None,
        max_texts: int | None = None,
        seed: int = 1029,
        split: str = "train",
        name: str | None = None,
        batch_size: int = 64,
        guide_cache_dir: str | None = None,
        exclude_eval_of: str | None = None,
    ) -> None:
        self.task_dir = Path(task_dir)
        self.exclude_eval_of = exclude_eval_of
        self.guide = dict(name=guide, revision=guide_revision, pooling=guide_pooling, max_length=guide_max_length)
        self.max_texts, self.seed, self.split, self.batch_size = max_texts, seed, split, batch_size
        self.name = name or task_slug(self.task_dir.name)
        self.guide_cache_dir = guide_cache_dir

    @property
    def task_name(self) -> str:
        return f"mteb-{self.name}-avs_triplets"

    def cache_path(self, cache_dir: str | Path) -> Path:
        data = _file_digest(self.task_dir / f"{self.split}.jsonl")
        extra = {"exclude": _excluded(self.exclude_eval_of)[1]} if self.exclude_eval_of else {}
        key = _key(guide=self.guide, max_texts=self.max_texts, seed=self.seed, data=data, name=self.name, v=1, **extra)
        return Path(cache_dir) / "mined" / f"{self.task_name}-{key}.jsonl"

    def build(self) -> list[dict]:
        from gist.core.encoder import Encoder, inference_device

        texts, labels = read_classification(self.task_dir, self.split)
        excluded, _ = _excluded(self.exclude_eval_of)
        if excluded:
            from gist.data.leakage import normalize

            keep = [i for i, t in enumerate(texts) if normalize(t) not in excluded]
            log.info(
                "%s: dropped %d train texts that occur in evaluation splits", self.task_name, len(texts) - len(keep)
            )
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        if self.max_texts is not None and self.max_texts < len(texts):
            pick = np.sort(np.random.default_rng(self.seed).choice(len(texts), self.max_texts, replace=False))
            texts, labels = [texts[i] for i in pick], [labels[i] for i in pick]
        encoder = Encoder(**self.guide)
        log.info("mining %s: embedding %d texts with %s", self.task_name, len(texts), self.guide["name"])
        embeddings = encoder.encode(
            texts, batch_size=self.batch_size, device=inference_device(), progress=f"mining {self.task_dir.name}"
        )
        if self.guide_cache_dir is not None:
            from gist.core.guide_cache import GuideCache
            from gist.data.records import text_id

            cache = GuideCache.for_encoder(self.guide_cache_dir, encoder)
            cache.add([text_id(t) for t in texts], embeddings)
            cache.flush()
        triplets = mine_triplets(embeddings, texts, labels, seed=self.seed)
        return [
            {
                "query": q,
                "pos": p,
                "neg": n,
                "task_name": self.task_name,
                "query_instruct": "",
                "pos_instruct": "",
                "neg_instruct": "",
                "symmetric": False,
            }
            for q, p, n in triplets
        ]

    def materialize(self, cache_dir: str | Path) -> Path:
        path = self.cache_path(cache_dir)
        if not path.exists():
            _write_jsonl(self.build(), path)
            log.info("mined %s -> %s", self.task_name, path)
        return path


class StsPairs:
    """STS pairs with score >= min_score as a symmetric pair task (query=sentence1, pos=sentence2);
    with `exclude_eval_of`, pairs with a sentence of an evaluation split are dropped."""

    def __init__(
        self,
        task_dir: str,
        split: str = "train",
        min_score: float = 4.0,
        task_name: str | None = None,
        exclude_eval_of: str | None = None,
    ):
        self.task_dir, self.split, self.min_score = Path(task_dir), split, min_score
        self.task_name = task_name or f"{task_slug(self.task_dir.name)}-pairs"
        self.exclude_eval_of = exclude_eval_of

    def build(self) -> list[dict]:
        from gist.data.leakage import normalize

        excluded, _ = _excluded(self.exclude_eval_of)
        rows = []
        for s1, s2, score in zip(*read_sts(self.task_dir, self.split)):
            if excluded and (normalize(s1) in excluded or normalize(s2) in excluded):
                continue
            if score >= self.min_score and s1.strip() and s2.strip() and s1 != s2:
                rows.append(
                    {
                        "query": s1,
                        "pos": s2,
                        "neg": None,
                        "task_name": self.task_name,
                        "query_instruct": "",
                        "pos_instruct": "",
                        "neg_instruct": "",
                        "symmetric": True,
                    }
                )
        return rows

    def materialize(self, cache_dir: str | Path) -> Path:
        data = _file_digest(self.task_dir / f"{self.split}.jsonl")
        extra = {"exclude": _excluded(self.exclude_eval_of)[1]} if self.exclude_eval_of else {}
        key = _key(data=data, min_score=self.min_score, name=self.task_name, v=1, **extra)
        path = Path(cache_dir) / "derived" / f"{self.task_name}-{key}.jsonl"
        if not path.exists():
            _write_jsonl(self.build(), path)
        return path


def mine_tasks(tasks_dir: str, tasks: list[str], **settings) -> list[MinedTriplets]:
    """One `MinedTriplets` per task folder name in `tasks` (folders of `tasks_dir`), all with the same
    `settings` (guide, max_texts, seed, ...: MinedTriplets' arguments). GISTDataModule flattens the list
    into its derived sources, so a config lists the mined tasks once (conf/data/quickstart.yaml)."""
    if not tasks:
        raise ValueError(f"mine_tasks needs at least one task folder of {tasks_dir}, got none")
    return [MinedTriplets(str(Path(tasks_dir) / name), **settings) for name in tasks]


# --- the command line (scripts/mine_triplets.py) ---------------------------------------------------------


def mine_to_file(task_dir: str | Path, out: str | Path, **settings) -> Path:
    """Mine one classification task folder into `out` (GIST-schema jsonl): the rows MinedTriplets(task_dir,
    **settings) materializes, with no cache left behind."""
    import shutil
    import tempfile

    out = Path(out)
    with tempfile.TemporaryDirectory() as cache:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(MinedTriplets(str(task_dir), **settings).materialize(cache)), out)
    return out


def main(argv: list[str] | None = None) -> int:
    """scripts/mine_triplets.py: --out FILE with one --task-dir, or --out-dir DIR (<task_name>.jsonl per task)."""
    import argparse

    parser = argparse.ArgumentParser(description="Mine GIST classification triplets from MTEB-layout task folders.")
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

    settings = {
        "guide": args.guide,
        "guide_pooling": args.guide_pooling,
        "guide_max_length": args.guide_max_length,
        "guide_revision": args.guide_revision,
        "max_texts": args.max_texts,
        "seed": args.seed,
        "split": args.split,
        "batch_size": args.batch_size,
    }
    for task_dir in args.task_dir:
        name = MinedTriplets(task_dir, **settings).task_name
        out = mine_to_file(task_dir, Path(args.out) if args.out else Path(args.out_dir) / f"{name}.jsonl", **settings)
        print(f"{name}: {sum(1 for _ in out.open())} rows -> {out}")
    return 0

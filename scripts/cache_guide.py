"""Precompute the guide-embedding cache over a training config's data (local files and hub streams).

    python scripts/cache_guide.py                                  # the quickstart's data and guide
    python scripts/cache_guide.py experiment=gist_small            # MEDI streamed from the hub, UAE-Large
    python scripts/cache_guide.py data=files data.train_files=[a.jsonl] guide=minilm

Same Hydra config as scripts/train.py, so the cache it fills is exactly the one training looks up
(guide, pooling, max length, storage dtype). Texts are embedded in chunks as the data streams by;
already-cached texts are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GIST_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gist.data import iter_rows  # noqa: E402
from gist.guide_cache import GuideCache  # noqa: E402

log = logging.getLogger("gist.cache_guide")


def fill_cache(cfg: DictConfig, chunk: int = 16384) -> GuideCache:
    if not cfg.get("guide"):
        raise ValueError("this config has no guide (guide=none): nothing to cache")
    datamodule = instantiate(cfg.data)
    datamodule.check_sources()
    guide = instantiate(cfg.guide)
    cache = GuideCache.for_encoder(cfg.guide_cache.dir, guide, dtype=cfg.guide_cache.dtype)
    pending: list[str] = []
    computed = 0
    for row in iter_rows([s.source for s in datamodule.sources()], datamodule.prepend_instructions):
        pending.extend(row[f] for f in ("query", "pos", "neg") if row[f])
        if len(pending) >= chunk:
            computed += cache.fill(guide, pending)
            pending = []
            log.info("guide cache %s: %d computed so far, %d cached", cache.dir, computed, len(cache))
    computed += cache.fill(guide, pending)
    print(f"guide cache {cache.dir}: {computed} texts computed, {len(cache)} cached")
    return cache


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    fill_cache(cfg)


if __name__ == "__main__":
    main()

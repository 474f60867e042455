"""Precompute the guide-embedding cache over a training config's data (local files and hub streams).

    python scripts/cache_guide.py                                  # the quickstart's data and guide
    python scripts/cache_guide.py experiment=gist_small            # MEDI streamed from the hub, UAE-Large
    python scripts/cache_guide.py data=files data.train_files=[a.jsonl] guide=minilm

Same Hydra config as scripts/train.py, so the cache it fills is exactly the one training looks up
(guide, pooling, max length, storage dtype). Texts are embedded in chunks as the data streams by;
already-cached texts are skipped, so an interrupted run resumes where it stopped. Logic:
gist.core.guide_cache.fill_from_datamodule.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GIST_ROOT", str(Path(__file__).resolve().parents[1]))

from gist.infra.hub import offline_unless_reachable  # noqa: E402

offline_unless_reachable()  # before transformers / datasets read HF_HUB_OFFLINE: no minutes of silent retries

import hydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gist.core.guide_cache import fill_from_datamodule  # noqa: E402

log = logging.getLogger("gist.cache_guide")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    if not cfg.get("guide"):
        raise SystemExit("error: this config has no guide (guide=none): nothing to cache")
    cache, computed = fill_from_datamodule(
        instantiate(cfg.data), instantiate(cfg.guide), cfg.guide_cache.dir, dtype=cfg.guide_cache.dtype, log=log.info
    )
    print(f"guide cache {cache.dir}: {computed} texts computed, {len(cache)} cached")


if __name__ == "__main__":
    main()

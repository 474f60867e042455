"""Train a text-embedding model with GISTEmbed, then export it as a sentence-transformers folder.

    python scripts/train.py                                   # the quickstart (offline, 2 CPU cores)
    python scripts/train.py experiment=gist_small             # the released GIST-small recipe
    python scripts/train.py loss=mnrl guide=none optim.lr=1e-5
    python scripts/train.py -m optim.lr=1e-5,5e-6 loss.temperature=0.01,0.05   # a sweep
    python scripts/train.py -m sweep=guide                    # a ready ablation sweep (conf/sweep/)

A thin Hydra entry point: the run itself is gist.train.train (build, fit, best checkpoint, export,
compare). Returns the optimized metric to sweepers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("GIST_ROOT", str(Path(__file__).resolve().parents[1]))

from gist.infra.hub import offline_unless_reachable  # noqa: E402

offline_unless_reachable()  # before transformers / datasets read HF_HUB_OFFLINE: no minutes of silent retries

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gist.infra.launch import ddp_child_argv  # noqa: E402
from gist.train import USER_ERRORS, train  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)  # stderr: kept by schedulers' job logs
        sys.exit(1)


if __name__ == "__main__":
    # A DDP child that Lightning starts inside a multirun job runs that one job, not the sweep (gist/infra/launch.py).
    sys.argv = ddp_child_argv(sys.argv, dict(os.environ))
    main()

"""Experiment loggers: CSV always; Weights & Biases offline unless the user configured a key."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_key_configured() -> bool:
    """True if WANDB_API_KEY is set or ~/.netrc holds credentials for the W&B API host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(mode: str | None = None, **kwargs):
    """A WandbLogger whose mode is `mode`, else WANDB_MODE, else online with a key / offline without.

    Returns None (with a warning) when wandb cannot start, so the run goes on with the CSV logger.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")
    try:
        Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
        return WandbLogger(mode=mode, **kwargs)
    except Exception as err:  # wandb missing or broken: never lose the run over its logger
        log.warning("W&B logger disabled (%s: %s); metrics still go to CSV", type(err).__name__, err)
        return None

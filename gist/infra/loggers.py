"""Experiment loggers: CSV always; Weights & Biases offline unless the user configured a key.

W&B never stops a run: if wandb is missing, has no key for online mode, has no network or its `init`
fails in any other way, `wandb_logger` warns and returns None and the run goes on with the CSV logger.
Offline runs are written to `<run_dir>/wandb/offline-run-*`; upload them later with

    wandb sync <run_dir>/wandb/offline-run-*            # one run
    wandb sync logs/<task>/multiruns/<time>/*/wandb/offline-run-*   # every job of a sweep
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

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


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger plus `log_exported_model`: upload the exported sentence-transformers folder
    as a W&B model artifact (Lightning's own `log_model` uploads checkpoints)."""

    def __init__(self, *args, log_exported_model: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log_exported_model = log_exported_model

    def log_model_dir(self, path: str | Path, aliases: list[str], metadata: dict | None = None) -> None:
        import wandb

        run = self.experiment
        # Not `model-<run id>`: that name is Lightning's, for its checkpoint artifacts (log_model).
        artifact = wandb.Artifact(f"sentence-transformers-{run.id}", type="model", metadata=metadata or {})
        artifact.add_dir(str(path))
        run.log_artifact(artifact, aliases=aliases)


def wandb_mode(mode: str | None = None) -> str:
    """`mode` if given, else WANDB_MODE, else online with a configured key / offline without."""
    return mode or os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")


def wandb_logger(mode: str | None = None, log_exported_model: bool = False, **kwargs) -> WandbLogger | None:
    """A WandbLogger in `wandb_mode(mode)`.

    The W&B run starts here (on global rank 0; other ranks get Lightning's dummy), so that a failing
    `wandb.init` is met before training: then this warns and returns None, and the run goes on with the
    CSV logger. kwargs go to Lightning's WandbLogger and on to `wandb.init` (project, name, group, tags...).
    """
    mode = wandb_mode(mode)
    try:
        Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(mode=mode, log_exported_model=log_exported_model, **kwargs)
        logger.experiment  # noqa: B018 - wandb.init now, not at the first logged metric
        return logger
    except Exception as err:  # wandb missing, no key, no network, init error: never lose the run over its logger
        log.warning("W&B logger disabled (%s: %s); metrics still go to CSV", type(err).__name__, err)
        _finish_quietly()
        return None


def log_exported_model(loggers, path: str | Path, aliases: list[str], metadata: dict | None = None) -> None:
    """Upload the exported model folder from each W&B logger that has `log_exported_model` set."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.log_exported_model:
            try:
                logger.log_model_dir(path, aliases, metadata)
            except Exception as err:  # the model is on disk either way
                log.warning("W&B model artifact not logged (%s: %s); the model is at %s", type(err).__name__, err, path)


def log_comparison(loggers, rows: list[dict]) -> None:
    """The end-of-run table (task, base, fine-tuned, delta) to each W&B run: a `wandb.Table` under
    `eval/comparison`, and summary metrics `mteb/<task>` (fine-tuned) and `mteb_base/<task>` (base)."""
    for logger in loggers:
        if not isinstance(logger, _LightningWandbLogger):
            continue
        try:
            import wandb

            run = logger.experiment
            columns = ["task", "base", "fine_tuned", "delta"]
            run.log({"eval/comparison": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
            for row in rows:
                task = row["task"].replace(" ", "")
                run.summary[f"mteb/{task}"] = row["fine_tuned"]
                run.summary[f"mteb_base/{task}"] = row["base"]
        except Exception as err:  # the table is on disk either way (<run_dir>/eval/comparison.*)
            log.warning("W&B comparison table not logged (%s: %s)", type(err).__name__, err)


def finish_wandb(loggers=()) -> None:
    """Close the W&B run of this job, so that the next job of a sweep starts its own (Lightning's
    WandbLogger reuses any run still open in the process)."""
    for logger in loggers:
        if isinstance(logger, _LightningWandbLogger) and logger._experiment is not None:
            run, logger._experiment = logger._experiment, None
            try:
                run.finish()  # on ranks > 0 Lightning's dummy experiment: a no-op
            except Exception as err:
                log.warning("wandb run.finish failed (%s: %s)", type(err).__name__, err)
    _finish_quietly()


def _finish_quietly() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        # A fresh W&B service per job: ranks spawned by ddp_spawn in a LATER job of the same process
        # could not attach to that job's run otherwise ("Unable to attach to run", wandb 0.31).
        wandb.teardown()
    except Exception as err:
        log.warning("wandb.finish failed (%s: %s)", type(err).__name__, err)

"""Train a text-embedding model with GISTEmbed, then export it as a sentence-transformers folder.

    python scripts/train.py                                   # the quickstart (offline, 2 CPU cores)
    python scripts/train.py experiment=gist_small             # the released GIST-small recipe
    python scripts/train.py loss=mnrl guide=none optim.lr=1e-5
    python scripts/train.py -m optim.lr=1e-5,5e-6 loss.temperature=0.01,0.05   # a sweep
    python scripts/train.py -m sweep=guide                    # a ready ablation sweep (conf/sweep/)

Reads top to bottom: seed, instantiate, wire, fit, export, compare (base vs fine-tuned on the MTEB
task folders of compare_tasks_dir), return the metric.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GIST_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gist.data import DataError  # noqa: E402
from gist.encoder import ModelUnavailableError  # noqa: E402
from gist.export import export_sentence_transformer  # noqa: E402
from gist.guide_cache import GuideCache  # noqa: E402
from gist.launch import ddp_child_argv, isolated_job, job_env, job_identity  # noqa: E402
from gist.loggers import finish_wandb, log_exported_model  # noqa: E402
from gist.module import GISTModule, NonFiniteError  # noqa: E402
from gist.evaluation import comparison_title, compare_models, encoder_model, markdown_table, pretrained_model  # noqa: E402
from gist.mteb_tasks import load_tasks  # noqa: E402
from gist.runs import Run  # noqa: E402

log = logging.getLogger("gist.train")


def train(cfg: DictConfig) -> float | None:
    """One run, or one job of a multirun: returns cfg.optimized_metric (the best checkpoint's) to sweepers.
    The job leaves nothing behind for the next one: W&B run finished, DDP environment and process group
    cleared (gist/launch.py)."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    with isolated_job(job_env(hydra_cfg, cfg.paths.output_dir), on_exit=[finish_wandb]):
        return run(cfg, wandb_identity=job_identity(hydra_cfg, cfg.task_name, cfg.paths.output_dir))


def run(cfg: DictConfig, wandb_identity: dict) -> float | None:
    seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP children (LOCAL_RANK > 0) share the folder
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    loss = instantiate(cfg.loss)
    has_guide = bool((cfg.get("guide") or {}).get("_target_"))  # guide=none leaves null (or an experiment's leftovers)
    if loss.requires_guide and not has_guide:
        raise ValueError(f"{type(loss).__name__} needs a guide model but guide=none: set guide=<mpnet|minilm|...>, "
                         "or use a guide-free loss with it (guide=none alone selects loss=no_guide; loss=mnrl works too)")
    # Data first: a missing file or unreachable hub dataset fails before any model loads.
    datamodule = instantiate(cfg.data)
    datamodule.check_sources()
    report_bad_rows(datamodule, output_dir)
    student = instantiate(cfg.model)
    guide = instantiate(cfg.guide) if has_guide and loss.requires_guide else None
    cache_cfg = cfg.get("guide_cache") or {}
    cache = GuideCache.for_encoder(cache_cfg.dir, guide, dtype=cache_cfg.dtype) if guide and cache_cfg.get("enabled") else None
    module = GISTModule(student, loss, guide, guide_cache=cache, bucket_size=cfg.get("bucket_size"), **cfg.optim)
    datamodule.configure_encoders(student, guide, guide_cache=cache, prefill_guide_cache=bool(cache_cfg.get("prefill")))

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    # W&B name and group (when not configured): a multirun job's run is grouped by its sweep.
    fill = {key: {k: v for k, v in wandb_identity.items() if key == "wandb" and c.get(k) is None} for key, c in (cfg.get("logger") or {}).items()}
    loggers = [lg for lg in (instantiate(c, **fill[key]) for key, c in (cfg.get("logger") or {}).items()) if lg is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    # Resume loads tensors and plain containers only (weights_only): a checkpoint cannot run code.
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    report_bad_rows(datamodule, output_dir, loggers)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if best:
        ckpt = torch.load(best, map_location="cpu", weights_only=True)
        module.load_state_dict(ckpt["state_dict"])
        score = trainer.checkpoint_callback.best_model_score
        if score is None:  # ddp_spawn returns the best path to the launching process, not the score
            states = [v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("ModelCheckpoint")]
            score = next((st["best_model_score"] for st in states if st.get("best_model_score") is not None), None)
        log.info("best checkpoint: %s (%s = %s)", best, cfg.optimized_metric, score)
        if score is not None:
            metrics[cfg.optimized_metric] = float(score)

    if trainer.is_global_zero and cfg.get("export"):
        path = export_sentence_transformer(module.student.cpu(), output_dir / "model")
        log.info("exported sentence-transformers model: %s", path)
        log_exported_model(loggers, path, aliases=["best" if best else "last"],
                           metadata={"checkpoint": best or None, cfg.optimized_metric: metrics.get(cfg.optimized_metric)})
        if cfg.get("compare_tasks_dir"):
            compare_on_tasks(cfg, module.student.eval(), output_dir, best or None, trainer.global_step)
        print(f"model: {path}\n")
    return metrics.get(cfg.optimized_metric)


def report_bad_rows(datamodule, output_dir: Path, loggers=()) -> None:
    """Rows skipped under data.on_bad_row=skip, per reason: <run_dir>/bad_rows.json and, once the
    loggers exist, metrics `data/skipped_<reason>` (and `data/skipped_rows`, their total)."""
    counts = dict(sorted(getattr(datamodule, "bad_rows", {}).items()))
    if not counts:
        return
    (output_dir / "bad_rows.json").write_text(json.dumps({"skipped_rows": sum(counts.values()), "by_reason": counts}, indent=1))
    log.warning("skipped %d bad training rows: %s (see %s)", sum(counts.values()), counts, output_dir / "bad_rows.json")
    metrics = {f"data/skipped_{reason}": float(n) for reason, n in counts.items()}
    metrics["data/skipped_rows"] = float(sum(counts.values()))
    for lg in loggers:
        lg.log_metrics(metrics, step=0)
        lg.save()


def compare_on_tasks(cfg: DictConfig, student, output_dir: Path, best_ckpt: str | None, last_step: int) -> None:
    """Base vs fine-tuned on every task folder of cfg.compare_tasks_dir (mteb's evaluators), printed and
    saved as <run_dir>/eval/comparison.{json,md}; the base model's results are reused across runs."""
    # The exported student is the best checkpoint's when there is one, else the last step's.
    step = int(torch.load(best_ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]) if best_ckpt else last_step
    base = pretrained_model(instantiate(cfg.model))
    fine_tuned = encoder_model(student, name=Run(output_dir).id, step=step, source=str(output_dir / "model"))
    rows = compare_models(base, fine_tuned, load_tasks(cfg.compare_tasks_dir), output_dir / "eval",
                          base_cache_dir=Path(cfg.paths.cache_dir) / "eval")
    print(f"\n{comparison_title(base.identity(), fine_tuned.identity())}, tasks in {cfg.compare_tasks_dir}:")
    print(markdown_table(rows), end="")
    print(f"table: {output_dir / 'eval' / 'comparison.md'}")


# Faults that are the user's to fix (data, model access, a diverging run): one clear line, exit 1,
# no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (DataError, ModelUnavailableError, NonFiniteError)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)  # stderr: kept by schedulers' job logs
        sys.exit(1)


if __name__ == "__main__":
    # A DDP child that Lightning starts inside a multirun job runs that one job, not the sweep (gist/launch.py).
    sys.argv = ddp_child_argv(sys.argv, dict(os.environ))
    main()

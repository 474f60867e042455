"""One training run, from a composed Hydra config to an exported, evaluated model.

    from gist.train import train
    score = train(cfg)          # cfg: conf/train.yaml composed (scripts/train.py does this from the CLI)

Reads top to bottom: `train` isolates the job (multirun x DDP x W&B, gist/infra/launch.py), `run` seeds,
builds (data, loss, student, guide, module, trainer), fits, reloads the best checkpoint, exports and
compares base vs fine-tuned on the MTEB task folders of `compare_tasks_dir`. Each stage is a function of
its own, so a notebook or a test can call one without the others.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gist.core.encoder import ModelUnavailableError
from gist.core.export import TrainingCard, export_sentence_transformer, write_model_card
from gist.core.guide_cache import GuideCache
from gist.core.module import GISTModule, GuideMismatchError, NonFiniteError, check_guide
from gist.data.records import DataError
from gist.evaluation.harness import compare_models, comparison_title, encoder_model, markdown_table, pretrained_model
from gist.evaluation.runs import Run
from gist.evaluation.tasks import load_tasks
from gist.infra.allocator import keep_freed_memory
from gist.infra.launch import isolated_job, job_env, job_identity
from gist.infra.loggers import finish_wandb, log_comparison, log_exported_model

log = logging.getLogger("gist.train")

# Faults that are the user's to fix (data, model access, a diverging run, a loss without its guide): one
# clear line and exit 1 in scripts/train.py, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (DataError, ModelUnavailableError, NonFiniteError, GuideMismatchError)


def build_part(node, **kwargs):
    """`instantiate(node)`, with a user error raised inside (a model not available offline, bad data)
    surfacing as itself rather than wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise


@dataclass
class Built:
    """Everything `fit` needs, built from the config (nothing has trained yet)."""

    module: GISTModule
    datamodule: object
    trainer: Trainer
    loggers: list


def train(cfg: DictConfig) -> float | None:
    """One run, or one job of a multirun: returns cfg.optimized_metric (the best checkpoint's) to sweepers.
    The job leaves nothing behind for the next one: W&B run finished, DDP environment and process group
    cleared (gist/infra/launch.py)."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    with isolated_job(job_env(hydra_cfg, cfg.paths.output_dir), on_exit=[finish_wandb]):
        return run(cfg, wandb_identity=job_identity(hydra_cfg, cfg.task_name, cfg.paths.output_dir))


def run(cfg: DictConfig, wandb_identity: dict | None = None) -> float | None:
    if cfg.keep_freed_memory:
        keep_freed_memory()  # no page faults on each step's large buffers (gist/infra/allocator.py)
    seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP children (LOCAL_RANK > 0) share the folder
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    built = build(cfg, output_dir, wandb_identity or {})
    # Resume loads tensors and plain containers only (weights_only): a checkpoint cannot run code.
    built.trainer.fit(built.module, datamodule=built.datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    report_bad_rows(built.datamodule, output_dir, built.loggers)
    metrics = {k: float(v) for k, v in built.trainer.callback_metrics.items()}
    best = load_best_checkpoint(built.trainer, built.module)
    if best is not None and best.score is not None:
        metrics[cfg.optimized_metric] = best.score
    if built.trainer.is_global_zero and cfg.get("export"):
        export_and_compare(cfg, built, output_dir, best, metrics.get(cfg.optimized_metric))
    return metrics.get(cfg.optimized_metric)


def build(cfg: DictConfig, output_dir: Path, wandb_identity: dict) -> Built:
    """Loss first (it says whether a guide is needed), then data (a missing file fails before any model
    loads), then the student, the guide and its cache, the module, loggers and trainer."""
    loss = build_part(cfg.loss)
    guide_cfg = cfg.get("guide")
    check_guide(loss, guide_cfg is not None)
    datamodule = build_part(cfg.data)
    datamodule.check_sources()
    report_bad_rows(datamodule, output_dir)
    student = build_part(cfg.model)
    guide = build_part(guide_cfg) if guide_cfg is not None else None
    cache_cfg = cfg.get("guide_cache") or {}
    cache = (
        GuideCache.for_encoder(cache_cfg.dir, guide, dtype=cache_cfg.dtype)
        if guide and cache_cfg.get("enabled")
        else None
    )
    module = GISTModule(
        student,
        loss,
        guide,
        guide_cache=cache,
        bucket_size=cfg.get("bucket_size"),
        bucket_tokens=cfg.get("bucket_tokens"),
        **cfg.optim,
    )
    datamodule.configure_encoders(student, guide, guide_cache=cache, prefill_guide_cache=bool(cache_cfg.get("prefill")))

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = build_loggers(cfg, wandb_identity)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return Built(module, datamodule, trainer, loggers)


def build_loggers(cfg: DictConfig, wandb_identity: dict) -> list:
    """The `logger` group's loggers; a W&B logger without a configured name/group gets the job's
    (a multirun job's run is grouped by its sweep)."""
    loggers = []
    for key, conf in (cfg.get("logger") or {}).items():
        fill = {k: v for k, v in wandb_identity.items() if key == "wandb" and conf.get(k) is None}
        lg = instantiate(conf, **fill)
        if lg is not None:
            loggers.append(lg)
    return loggers


@dataclass
class BestCheckpoint:
    path: str
    score: float | None  # the monitored metric (cfg.optimized_metric)
    step: int


def load_best_checkpoint(trainer: Trainer, module: GISTModule) -> BestCheckpoint | None:
    """Load the best checkpoint's weights into `module` and describe it; None when no checkpoint was
    selected (the module keeps the last step's weights)."""
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") if callback else ""
    if not best:
        return None
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    score = callback.best_model_score
    if score is None:  # ddp_spawn returns the best path to the launching process, not the score
        states = [v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("ModelCheckpoint")]
        score = next((st["best_model_score"] for st in states if st.get("best_model_score") is not None), None)
    log.info("best checkpoint: %s (score %s)", best, score)
    return BestCheckpoint(best, None if score is None else float(score), int(ckpt["global_step"]))


def export_and_compare(
    cfg: DictConfig, built: Built, output_dir: Path, best: BestCheckpoint | None, score: float | None
) -> Path:
    """<run_dir>/model (the best checkpoint's student, else the last step's), logged as an artifact, then
    the base-vs-fine-tuned table when compare_tasks_dir is set, which the model card then shows."""
    student = built.module.student.cpu()
    card = training_card(cfg, built, best)
    path = export_sentence_transformer(
        student, output_dir / "model", card, save_adapter=bool(cfg.get("export_adapter"))
    )
    log.info("exported sentence-transformers model: %s", path)
    log_exported_model(
        built.loggers,
        path,
        aliases=["best" if best else "last"],
        metadata={"checkpoint": best.path if best else None, cfg.optimized_metric: score},
    )
    if cfg.get("compare_tasks_dir"):
        step = best.step if best else built.trainer.global_step
        rows = compare_on_tasks(cfg, student.eval(), output_dir, step)
        log_comparison(built.loggers, rows)
        card.results = markdown_table(rows)
        write_model_card(path, student, card)
    print(f"model: {path}\n")
    return path


def training_card(cfg: DictConfig, built: Built, best: BestCheckpoint | None) -> TrainingCard:
    """What the exported model card says about this run, from its config and trainer."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    guide = cfg.get("guide")
    data = cfg.data
    sources = [str(f) for f in data.get("train_files") or []]
    sources += [f"{h['name']}@{h.get('revision') or 'main'}" for h in data.get("hub_datasets") or []]
    sources += [str(s.get("path") or s.get("name") or s) for s in data.get("sources") or []]
    sources += [type(s).__name__ for s in getattr(built.datamodule, "derived", [])]
    trainer = built.trainer
    return TrainingCard(
        guide=f"{guide.name}" + (f"@{guide.revision}" if guide.get("revision") else "") if guide else None,
        loss=str(loss.pop("_target_", "")).rsplit(".", 1)[-1],
        loss_params=loss,
        data=sources,
        hyperparameters={
            "steps": trainer.global_step,
            "exported step": best.step if best else trainer.global_step,
            "batch size (per device)": data.get("batch_size"),
            "devices": trainer.world_size,
            "learning rate": cfg.optim.get("lr"),
            "warmup steps": cfg.optim.get("warmup_steps"),
            "precision": str(trainer.precision),
            "seed": cfg.seed,
        },
    )


def report_bad_rows(datamodule, output_dir: Path, loggers=()) -> None:
    """Rows skipped under data.on_bad_row=skip, per reason: <run_dir>/bad_rows.json and, once the
    loggers exist, metrics `data/skipped_<reason>` (and `data/skipped_rows`, their total)."""
    counts = dict(sorted(getattr(datamodule, "bad_rows", {}).items()))
    if not counts:
        return
    total = sum(counts.values())
    (output_dir / "bad_rows.json").write_text(json.dumps({"skipped_rows": total, "by_reason": counts}, indent=1))
    log.warning("skipped %d bad training rows: %s (see %s)", total, counts, output_dir / "bad_rows.json")
    metrics = {f"data/skipped_{reason}": float(n) for reason, n in counts.items()}
    metrics["data/skipped_rows"] = float(total)
    for lg in loggers:
        lg.log_metrics(metrics, step=0)
        lg.save()


def compare_on_tasks(cfg: DictConfig, student, output_dir: Path, step: int) -> list[dict]:
    """Base vs fine-tuned on every task folder of cfg.compare_tasks_dir (mteb's evaluators), printed and
    saved as <run_dir>/eval/comparison.{json,md}; the base model's results are reused across runs."""
    base = pretrained_model(instantiate(cfg.model))
    fine_tuned = encoder_model(student, name=Run(output_dir).id, step=step, source=str(output_dir / "model"))
    tasks = load_tasks(cfg.compare_tasks_dir)
    cache = Path(cfg.paths.cache_dir) / "eval"
    rows = compare_models(base, fine_tuned, tasks, output_dir / "eval", base_cache_dir=cache)
    for dim in cfg.get("compare_dims") or []:  # Matryoshka: the same comparison at truncated widths
        if dim == student.dim:
            continue
        at = compare_models(
            base.truncated(dim),
            fine_tuned.truncated(dim),
            tasks,
            output_dir / "eval" / f"dim{dim}",
            base_cache_dir=cache,
        )
        rows += [{**r, "task": f"{r['task']} @{dim}d"} for r in at]
    print(f"\n{comparison_title(base.identity(), fine_tuned.identity())}, tasks in {cfg.compare_tasks_dir}:")
    print(markdown_table(rows), end="")
    print(f"table: {output_dir / 'eval' / 'comparison.md'}")
    return rows

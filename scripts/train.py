"""Train a text-embedding model with GISTEmbed, then export it as a sentence-transformers folder.

    python scripts/train.py                                   # the quickstart (offline, 2 CPU cores)
    python scripts/train.py experiment=gist_small             # the released GIST-small recipe
    python scripts/train.py loss=mnrl guide=none optim.lr=1e-5
    python scripts/train.py -m optim.lr=1e-5,5e-6 loss.temperature=0.01,0.05   # a sweep

Reads top to bottom: seed, instantiate, wire, fit, export, compare (base vs fine-tuned on the MTEB
task folders of compare_tasks_dir), return the metric.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GIST_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gist.export import export_sentence_transformer  # noqa: E402
from gist.guide_cache import GuideCache  # noqa: E402
from gist.module import GISTModule  # noqa: E402
from gist.evaluation import comparison_title, compare_models, encoder_model, markdown_table, pretrained_model  # noqa: E402
from gist.mteb_tasks import load_tasks  # noqa: E402
from gist.runs import Run  # noqa: E402

log = logging.getLogger("gist.train")


def train(cfg: DictConfig) -> float | None:
    seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    # Data first: a missing file or unreachable hub dataset fails before any model loads.
    datamodule = instantiate(cfg.data)
    datamodule.check_sources()
    loss = instantiate(cfg.loss)
    student = instantiate(cfg.model)
    guide = instantiate(cfg.guide) if cfg.get("guide") and loss.requires_guide else None
    cache_cfg = cfg.get("guide_cache") or {}
    cache = GuideCache.for_encoder(cache_cfg.dir, guide, dtype=cache_cfg.dtype) if guide and cache_cfg.get("enabled") else None
    module = GISTModule(student, loss, guide, guide_cache=cache, **cfg.optim)
    datamodule.configure_encoders(student, guide, guide_cache=cache, prefill_guide_cache=bool(cache_cfg.get("prefill")))

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [lg for lg in (instantiate(c) for c in (cfg.get("logger") or {}).values()) if lg is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        score = trainer.checkpoint_callback.best_model_score
        log.info("best checkpoint: %s (%s = %s)", best, cfg.optimized_metric, score)
        if score is not None:  # None in the launching process of ddp_spawn (only the best path comes back)
            metrics[cfg.optimized_metric] = float(score)

    if trainer.is_global_zero and cfg.get("export"):
        path = export_sentence_transformer(module.student.cpu(), output_dir / "model")
        log.info("exported sentence-transformers model: %s", path)
        if cfg.get("compare_tasks_dir"):
            compare_on_tasks(cfg, module.student.eval(), output_dir, best or None, trainer.global_step)
        print(f"model: {path}\n")
    return metrics.get(cfg.optimized_metric)


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()

"""Configs saved by older runs (<run_dir>/config.yaml) in today's layout.

The package was split into layers (gist.core / data / evaluation / analysis / infra); a config written
before that names its classes by their old module (`_target_: gist.encoder.Encoder`). `upgrade_config`
rewrites every such `_target_` to its new home and says what changed, once; a `_target_` under `gist.`
that exists in neither layout is an error naming the key and both layouts.

    from gist.infra.compat import upgrade_config
    cfg, changes = upgrade_config(OmegaConf.load("logs/quickstart/runs/<time>/config.yaml"))
"""

from __future__ import annotations

import importlib
import logging

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

# Old module -> new module (the package layout before and after the split into layers).
MOVED_MODULES = {
    "gist.losses": "gist.core.loss_modules",  # the `loss=` classes; the pure functions are in gist.core.losses
    "gist.encoder": "gist.core.encoder",
    "gist.module": "gist.core.module",
    "gist.gradcache": "gist.core.gradcache",
    "gist.guide_cache": "gist.core.guide_cache",
    "gist.export": "gist.core.export",
    "gist.data": "gist.data.batching",  # SameTaskBatches; other names: see _resolve
    "gist.datamodule": "gist.data.datamodule",
    "gist.mining": "gist.data.mining",
    "gist.leakage": "gist.data.leakage",
    "gist.evaluation": "gist.evaluation.harness",
    "gist.mteb_tasks": "gist.evaluation.tasks",
    "gist.runs": "gist.evaluation.runs",
    "gist.ablation": "gist.analysis.ablation",
    "gist.report": "gist.analysis.report",
    "gist.distributed": "gist.infra.distributed",
    "gist.launch": "gist.infra.launch",
    "gist.loggers": "gist.infra.loggers",
    "gist.offline_models": "gist.infra.offline_models",
    "gist.checkpoint": "gist.infra.checkpoint",
    "gist.callbacks": "gist.infra.callbacks",
}
# gist/data.py was split by concern: a name from it is looked up in each of these.
_DATA_MODULES = ("gist.data.records", "gist.data.sources", "gist.data.batching", "gist.data.collate")


class OldConfigError(ValueError):
    """A saved config names a class that no longer exists."""


def _exists(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def _resolve(target: str) -> str:
    """Today's dotted path of `target` (unchanged when it still imports)."""
    module, _, name = target.rpartition(".")
    if not module.startswith("gist") or _exists(module, name):
        return target
    candidates = _DATA_MODULES if module == "gist.data" else (MOVED_MODULES.get(module),)
    for new in candidates:
        if new and _exists(new, name):
            return f"{new}.{name}"
    raise OldConfigError(
        f"_target_ {target!r} names a class that is in neither the old nor the current layout of the gist "
        f"package (modules moved: {', '.join(f'{a} -> {b}' for a, b in MOVED_MODULES.items())})"
    )


def upgrade_config(cfg: DictConfig) -> tuple[DictConfig, dict[str, str]]:
    """A copy of `cfg` with every moved `_target_` rewritten; returns it and {old: new} of the changes."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    changes: dict[str, str] = {}

    def walk(node) -> None:
        items = node.items() if isinstance(node, DictConfig) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, (DictConfig, ListConfig)):
                walk(value)
            elif key == "_target_" and isinstance(value, str):
                new = _resolve(value)
                if new != value:
                    changes[value] = new
                    node[key] = new

    walk(cfg)
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "prepend_instructions" in data:
        # Instructions became a setting of each encoder (gist.core.inputs): the old data-level switch
        # prepended the row's instruction and a space to every text, for the student and the guide alike.
        if data.pop("prepend_instructions"):
            for key in ("model", "guide"):
                if isinstance(cfg.get(key), DictConfig):
                    cfg[key]["instructions"] = {"query": "{instruct} ", "document": "{instruct} "}
            changes["data.prepend_instructions=true"] = "model.instructions / guide.instructions"
        else:
            changes["data.prepend_instructions=false"] = "(removed: instructions are unused unless configured)"
    if changes:
        log.warning(
            "config written by an older gist layout; classes moved: %s",
            ", ".join(f"{a} -> {b}" for a, b in sorted(changes.items())),
        )
    return cfg, changes

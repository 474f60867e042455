"""MTEB evaluation of our encoders with mteb's own task evaluators (no metric is re-implemented here).

Every evaluated model carries an explicit name and revision: a hub commit for hub models, a digest of
the weights (plus the checkpoint step when known) for local folders, run checkpoints and in-memory
students. mteb's result cache and ours (`evaluate(cache_dir=...)`) are keyed by name + revision, so
two checkpoints can never share results.
Encoding goes through `gist.core.encoder.Encoder.encode` (length-sorted batches, inference mode).

    from gist.evaluation.harness import resolve_model, evaluate, main_scores
    from gist.evaluation.tasks import load_tasks
    details = evaluate(resolve_model("sentence-transformers/all-MiniLM-L6-v2"), load_tasks("data/mteb"))
    main_scores(details)   # {"STSBenchmark": 82.03, ...}  (main score x 100)

CLI: scripts/eval.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gist.core.encoder import Encoder, hub_commit, inference_device
from gist.evaluation.runs import Run, is_run_dir, load_run


@dataclass
class EvalModel:
    """An encoder and the identity its results are filed under."""

    encoder: Encoder
    name: str  # "org/name" as mteb wants it
    revision: str
    step: int | None = None  # training step of a checkpoint, when known
    source: str = ""  # what the user pointed at (hub id, folder, checkpoint)
    truncate_dim: int | None = None  # evaluate the first `truncate_dim` coordinates (Matryoshka), re-normalised

    def identity(self) -> dict:
        identity = {
            "name": self.name,
            "revision": self.revision,
            "step": self.step,
            "source": self.source,
            "pooling": self.encoder.pooling,
            "max_length": self.encoder.max_length,
            "dim": self.truncate_dim or self.encoder.dim,
        }
        if self.prompts:
            identity["prompts"] = self.prompts
        if self.truncate_dim:
            identity["truncate_dim"] = self.truncate_dim
        return identity

    @property
    def prompts(self) -> dict[str, str]:
        """The encoder's non-empty named prompts, which mteb picks from per task (`get_prompt`)."""
        return {k: v for k, v in self.encoder.prompts.items() if v}

    def truncated(self, dim: int | None) -> EvalModel:
        """The same model evaluated at its first `dim` coordinates (None: full width)."""
        if dim is not None and not 0 < dim <= self.encoder.dim:
            raise ValueError(f"truncate_dim must lie in [1, {self.encoder.dim}] (the embedding width), got {dim}")
        return dataclasses.replace(self, truncate_dim=dim if dim != self.encoder.dim else None)


def weights_digest(encoder: Encoder) -> str:
    """Hash of everything that changes the embeddings: weights (the transformer's and the modules after
    pooling, e.g. Dense), pooling, max length, tokenizer vocabulary. (Prompts are part of the identity.)"""
    digest = hashlib.sha256(f"{encoder.pooling}|{encoder.max_length}|{len(encoder.tokenizer)}".encode())
    for key, tensor in encoder.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def encoder_model(encoder: Encoder, name: str | None = None, step: int | None = None, source: str = "") -> EvalModel:
    """An encoder whose weights may differ from any published ones (a student, a checkpoint): its
    revision is `step<N>-<weights digest>`."""
    prefix = f"step{step}-" if step is not None else ""
    return EvalModel(
        encoder,
        name or f"local/{Path(encoder.name).name}",
        f"{prefix}{weights_digest(encoder)}",
        step,
        source or encoder.name,
    )


def pretrained_model(encoder: Encoder) -> EvalModel:
    """An encoder exactly as loaded: a hub id is filed under its commit, a local folder under its weights."""
    if Path(encoder.name).is_dir():
        return encoder_model(encoder, name=f"local/{Path(encoder.name).resolve().name}", source=encoder.name)
    # A revision that is not in the cache (e.g. online, a branch) is kept as the user gave it.
    revision = hub_commit(encoder.name, encoder.revision) or encoder.revision or f"sha-{weights_digest(encoder)}"
    return EvalModel(encoder, encoder.name, revision, None, encoder.name)


def resolve_model(spec: str, revision: str | None = None, checkpoint: str | None = None) -> EvalModel:
    """A run dir (its exported model, or `checkpoint`), a sentence-transformers/transformers folder, or a hub id."""
    path = Path(spec)
    if path.is_dir() and is_run_dir(path):
        return run_model(load_run(path), checkpoint)
    if checkpoint is not None:
        raise ValueError(f"checkpoint={checkpoint!r} needs a run directory, got {spec!r}")
    return pretrained_model(Encoder(spec, revision=revision))


def _mteb_wrapper(model: EvalModel):
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder, get_prompt
    from mteb.models.model_meta import ScoringFunction

    class GistMtebEncoder(AbsEncoder):
        """`Encoder` behind mteb's EncoderProtocol; counts texts and encoding time for the throughput log."""

        def __init__(self) -> None:
            self.model = model.encoder
            self.model_prompts = model.prompts or None  # mteb's prompt mechanism: task name, type, query/document
            self.mteb_model_meta = ModelMeta.create_empty(
                overwrites=dict(
                    name=model.name,
                    revision=model.revision,
                    similarity_fn_name=ScoringFunction.COSINE,
                    embed_dim=model.truncate_dim or model.encoder.dim,
                    max_tokens=model.encoder.max_length,
                    framework=["PyTorch"],
                    modalities=["text"],
                )
            )
            self.texts, self.seconds = 0, 0.0

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
            texts = [text for batch in inputs for text in batch["text"]]
            # Each distinct text once (STSBenchmark test repeats 8% of its sentences).
            unique = list(dict.fromkeys(texts))
            start = time.perf_counter()
            prompt = get_prompt(self.model_prompts, task_metadata, prompt_type) or ""
            emb = self.model.encode(  # (U, d) unit norm
                unique,
                batch_size=kwargs.get("batch_size", 64),
                device=inference_device(),
                prompt=prompt,
                progress=getattr(task_metadata, "name", None) or "encoding",
            )
            if model.truncate_dim:
                emb = torch.nn.functional.normalize(emb[:, : model.truncate_dim], dim=-1)
            self.seconds += time.perf_counter() - start
            self.texts += len(unique)
            position = {text: i for i, text in enumerate(unique)}
            return emb[[position[t] for t in texts]].numpy()  # (N, d), input order

    return GistMtebEncoder()


def evaluate(model: EvalModel, tasks: list, *, batch_size: int = 64, cache_dir: str | Path | None = None) -> dict:
    """Run mteb's evaluators; returns details: model identity, mteb version, every metric per task.

    Args:
        model: from `resolve_model` / `encoder_model` / `pretrained_model`.
        tasks: mteb tasks (`gist.evaluation.tasks.load_tasks` / `hub_tasks`).
        batch_size: encoding batch size.
        cache_dir: reuse per-task results saved here, keyed by model name + revision, task name, the
            task's data digest, mteb version and protocol; None = evaluate everything afresh. (mteb's own
            result cache would key on names only, and miss a change of a local task folder's data.)
    """
    import mteb

    start = time.perf_counter()
    entries, todo = {}, []
    for task in tasks:
        path = _cache_path(cache_dir, model, task) if cache_dir is not None else None
        if path is not None and path.is_file():
            entries[task.metadata.name] = {**json.loads(path.read_text()), "cached": str(path)}
        else:
            todo.append(task)
    wrapper = _mteb_wrapper(model)
    if todo:
        with _quiet_mteb():
            # cache=None: mteb's result cache never answers for us (see `cache_dir`); every run is a fresh run.
            result = mteb.evaluate(
                wrapper,
                todo,
                cache=None,
                overwrite_strategy="always",
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                co2_tracker=False,
                show_progress_bar=False,
                raise_error=True,
            )
        by_name = {t.metadata.name: t for t in todo}
        for res in result.task_results:
            task = by_name[res.task_name]
            entries[res.task_name] = entry = {
                "main_score": 100.0 * float(res.get_score()),
                "main_score_name": task.metadata.main_score,
                "splits": list(task.eval_splits),
                "subsets": list(task.hf_subsets),
                "data": str(getattr(task, "task_dir", task.metadata.dataset["path"])),
                "data_revision": _data_revision(task),
                "protocol": _protocol(task),
                "evaluation_time": res.evaluation_time,
                "scores": res.scores,
            }
            if cache_dir is not None:
                path = _cache_path(cache_dir, model, task)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(entry, default=str))
    return {
        "model": model.identity(),
        "mteb_version": mteb.__version__,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - start, 2),
        "encode": {
            "texts": wrapper.texts,
            "seconds": round(wrapper.seconds, 2),
            "texts_per_s": round(wrapper.texts / wrapper.seconds, 1) if wrapper.seconds else None,
        },
        "tasks": {t.metadata.name: entries[t.metadata.name] for t in tasks},
    }


class _DropSuperseded(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is superseded by" not in record.getMessage()


@contextmanager
def _quiet_mteb():
    """mteb at WARNING (its INFO lines are per classifier experiment), without the "superseded by .v2"
    warning: the original tasks are the ones the published scores were computed on."""
    logger = logging.getLogger("mteb")
    level = logger.level
    drop = _DropSuperseded()
    loggers = [logging.getLogger("mteb.abstasks.abstask"), logging.getLogger("mteb.evaluate")]
    logger.setLevel(max(level, logging.WARNING))
    for lg in loggers:
        lg.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is superseded by.*")
            yield
    finally:
        logger.setLevel(level)
        for lg in loggers:
            lg.removeFilter(drop)


def _data_revision(task) -> str:
    """Digest of a local task folder's files in use, or the hub dataset revision of an mteb task."""
    from gist.evaluation.tasks import data_digest

    if hasattr(task, "task_dir"):
        return data_digest(task.task_dir, task.data_splits())
    return str(task.metadata.dataset["revision"])


def _cache_path(cache_dir: str | Path, model: EvalModel, task) -> Path:
    import mteb

    key = json.dumps(
        [
            model.name,
            model.revision,
            *([{"prompts": model.prompts}] if model.prompts else []),
            *([{"truncate_dim": model.truncate_dim}] if model.truncate_dim else []),
            task.metadata.name,
            _data_revision(task),
            mteb.__version__,
            _protocol(task),
            list(task.eval_splits),
            list(task.hf_subsets),
        ],
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / model.name.replace("/", "__") / model.revision / f"{task.metadata.name}-{digest}.json"


def _protocol(task) -> dict:
    """The class-level protocol a result depends on (the attributes a metadata-only copy would lose)."""
    base = getattr(task, "protocol_class", type(task))
    out = {"class": f"{base.__module__}.{base.__qualname__}", "seed": task.seed}
    for attr in ("samples_per_label", "n_experiments", "train_split", "min_score", "max_score"):
        if hasattr(task, attr):
            out[attr] = getattr(task, attr)
    return out


def main_scores(details: dict) -> dict[str, float]:
    """{task: main score x 100}, rounded to 4 decimals."""
    return {name: round(t["main_score"], 4) for name, t in details["tasks"].items()}


def write_results(details: dict, output: str | Path) -> tuple[Path, Path]:
    """`output` gets {task: main score x 100}; `<output stem>.details.json` beside it gets everything."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(main_scores(details), indent=1) + "\n")
    full = output.with_name(output.stem + ".details.json")
    full.write_text(json.dumps(details, indent=1, default=str) + "\n")
    return output, full


def compare(base: dict[str, float], fine_tuned: dict[str, float]) -> list[dict]:
    """Rows (task, base, fine_tuned, delta) for the tasks both have, plus their mean."""
    rows = [
        {"task": t, "base": base[t], "fine_tuned": fine_tuned[t], "delta": fine_tuned[t] - base[t]}
        for t in base
        if t in fine_tuned
    ]
    if len(rows) > 1:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("base", "fine_tuned", "delta")}
        rows.append({"task": "mean", **mean})
    return rows


def compare_models(
    base: EvalModel,
    fine_tuned: EvalModel,
    tasks: list,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    base_cache_dir: str | Path | None = None,
) -> list[dict]:
    """Evaluate both models; save `<out_dir>/{base,fine_tuned}.json` (+ details) and the table as
    `comparison.json` / `comparison.md`. Returns the table rows (see `compare`).

    base_cache_dir: reuse the base model's results across runs (its name + revision name its weights).
    """
    out_dir = Path(out_dir)
    details = {
        "base": evaluate(base, tasks, batch_size=batch_size, cache_dir=base_cache_dir),
        "fine_tuned": evaluate(fine_tuned, tasks, batch_size=batch_size),
    }
    for label, d in details.items():
        write_results(d, out_dir / f"{label}.json")
    rows = compare(main_scores(details["base"]), main_scores(details["fine_tuned"]))
    header = {
        label: {
            **d["model"],
            "seconds": d["seconds"],
            "cached_tasks": [t for t, e in d["tasks"].items() if "cached" in e],
        }
        for label, d in details.items()
    }
    (out_dir / "comparison.json").write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
    (out_dir / "comparison.md").write_text(
        comparison_title(details["base"]["model"], details["fine_tuned"]["model"]) + "\n\n" + markdown_table(rows)
    )
    return rows


def comparison_title(base: dict, fine_tuned: dict) -> str:
    step = f" step {fine_tuned['step']}" if fine_tuned.get("step") is not None else ""
    return (
        f"MTEB main score x100: base {base['name']}@{str(base['revision'])[:12]} vs fine-tuned "
        f"{fine_tuned['name']}{step} ({fine_tuned['revision']})"
    )


def markdown_table(rows: list[dict], columns: tuple[str, ...] = ("task", "base", "fine_tuned", "delta")) -> str:
    """A markdown table; numbers with 2 decimals (deltas signed), missing cells empty."""

    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        if isinstance(value, str):
            return value
        if value is None or value != value:  # missing or NaN
            return ""
        return ("{:+.2f}" if column == "delta" else "{:.2f}").format(value)

    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" if c == "task" else "---:" for c in columns) + "|\n"
    return head + "".join("| " + " | ".join(cell(r, c) for c in columns) + " |\n" for r in rows)


def reference_scores(data_dir: str | Path, model_name: str) -> dict[str, float]:
    """Published scores of `model_name` from `<data_dir>/reference_scores.json` (empty if none)."""
    path = Path(data_dir) / "reference_scores.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("scores", {}).get(model_name, {})


def run_model(run: Run, checkpoint: str | None = None) -> EvalModel:
    """A run's exported model (or `checkpoint`'s student) with the identity its results are filed under:
    name = run id, revision = step + weights."""
    step = run.checkpoint(checkpoint).step if checkpoint else run.exported_step()
    source = str(run.checkpoint(checkpoint).path if checkpoint else run.model_dir)
    return encoder_model(run.load_model(checkpoint), name=run.id, step=step, source=source)


def evaluate_run(
    run: Run, tasks: list, labels: list[str] | None = None, batch_size: int = 64, cache_dir: str | Path | None = None
) -> dict[str, dict[str, float]]:
    """Evaluate what has no results yet in the run's eval/ (default: `base` and every checkpoint), save, and
    return `run.results()`. Labels: `base`, `fine_tuned` (the exported model) or checkpoint labels."""
    names = {t.metadata.name for t in tasks}
    done = run.results()
    for label in labels or ["base", *[c.label for c in run.checkpoints]]:
        if names <= set(done.get(label, {})):
            continue
        model = (
            pretrained_model(run.base_model())
            if label == "base"
            else run_model(run, None if label == "fine_tuned" else label)
        )
        details = evaluate(model, tasks, batch_size=batch_size, cache_dir=cache_dir if label == "base" else None)
        write_results(details, run.path / "eval" / f"{label}.json")
    return run.results()

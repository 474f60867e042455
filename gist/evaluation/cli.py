"""Evaluate a model on MTEB tasks with mteb's own evaluators and write its results files: what
scripts/eval.py runs (its options are documented there).

    from gist.evaluation.cli import evaluate_model
    scores = evaluate_model("sentence-transformers/all-MiniLM-L6-v2", data_dir="data/mteb", output="minilm.json")
    scores = evaluate_model("logs/quickstart/runs/<time>", checkpoint="last", data_dir="data/mteb")  # -> <run>/eval/

The harness itself is gist/evaluation/harness.py; task folders gist/evaluation/tasks.py; run folders
gist/evaluation/runs.py.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from gist.evaluation.harness import (
    evaluate,
    main_scores,
    markdown_table,
    reference_scores,
    resolve_model,
    write_results,
)
from gist.evaluation.runs import is_run_dir, load_run
from gist.evaluation.tasks import hub_tasks, load_tasks

log = logging.getLogger("gist.eval")

USAGE = """key=value options: model (run dir | sentence-transformers folder | hub id; required), revision (hub),
checkpoint (run dir: `last`, `best` or a checkpoint name; default: the exported model), data_dir (a folder of
task folders), tasks (list; default all under data_dir), output (JSON {task: main score x 100}; default for a
run dir: <run>/eval/<checkpoint file name or fine_tuned>[-dim<N>].json), batch_size, cache_dir, truncate_dim (evaluate
the first N embedding coordinates, re-normalised: Matryoshka models). See scripts/eval.py."""


class EvalArgumentError(ValueError):
    """Evaluation options that do not go together (no output for a non-run model, hub tasks offline, ...)."""


@dataclass
class EvalConfig:
    model: str = "???"
    revision: str | None = None
    checkpoint: str | None = None
    data_dir: str | None = None
    tasks: list[str] | None = None
    output: str | None = None
    batch_size: int = 64
    cache_dir: str | None = None
    truncate_dim: int | None = None


def parse(argv: list[str]) -> EvalConfig:
    """key=value arguments -> EvalConfig; SystemExit with a message for bad ones (or the usage for --help)."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        sys.exit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        sys.exit(f"arguments are key=value, got {bad}; see --help")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(argv))
    except Exception as err:  # omegaconf's errors name the bad key/value
        sys.exit(f"bad arguments: {err}")
    if OmegaConf.is_missing(cfg, "model"):
        sys.exit("model=<run dir | sentence-transformers folder | hub id> is required; see --help")
    return OmegaConf.to_object(cfg)


def default_output(model: str, checkpoint: str | None = None, truncate_dim: int | None = None) -> Path:
    """Where a run directory's evaluation is filed: <run>/eval/<checkpoint file name or fine_tuned>.json
    (checkpoints under their file name, as notebooks/compare_checkpoints.ipynb expects; `-dim<N>` added
    for a truncated evaluation)."""
    if not is_run_dir(model):
        raise EvalArgumentError("output=<file.json> is required unless model is a run directory")
    label = load_run(model).checkpoint(checkpoint).label if checkpoint else "fine_tuned"
    return Path(model) / "eval" / f"{label}{f'-dim{truncate_dim}' if truncate_dim else ''}.json"


def select_tasks(data_dir: str | Path | None, tasks: list[str] | None):
    """The task folders under `data_dir` (all, or `tasks`), or MTEB's hub tasks `tasks` (online only)."""
    if data_dir:
        return load_tasks(data_dir, tasks)
    if tasks:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise EvalArgumentError(
                f"tasks={tasks} without data_dir loads MTEB's data from the Hugging Face hub, but HF_HUB_OFFLINE is "
                "set: unset it (with network access), or evaluate local task folders with data_dir=data/mteb"
            )
        return hub_tasks(tasks)
    raise EvalArgumentError(
        "pass data_dir=<folder of task folders> (e.g. data/mteb) or tasks=[...] of MTEB's hub tasks"
    )


def evaluate_model(
    model: str,
    *,
    data_dir: str | Path | None = None,
    tasks: list[str] | None = None,
    output: str | Path | None = None,
    revision: str | None = None,
    checkpoint: str | None = None,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    truncate_dim: int | None = None,
) -> dict[str, float]:
    """Evaluate `model` (a run directory, a sentence-transformers folder or a hub id) and write `output`
    (scores) and `<stem>.details.json` beside it; print the table (with published scores from
    `<data_dir>/reference_scores.json` when it has the model). Returns {task: main score x 100}.
    EvalArgumentError for options that do not go together."""
    output = Path(output) if output else default_output(model, checkpoint, truncate_dim)
    # The original tasks (not `.v2`) are the ones the published numbers were computed on.
    warnings.filterwarnings("ignore", message=".*is superseded by.*")
    task_list = select_tasks(data_dir, tasks)
    try:
        resolved = resolve_model(model, revision=revision, checkpoint=checkpoint).truncated(truncate_dim)
    except ValueError as err:
        raise EvalArgumentError(str(err)) from err
    log.info("evaluating %s @ %s on %s", resolved.name, resolved.revision, [t.metadata.name for t in task_list])
    details = evaluate(resolved, task_list, batch_size=batch_size, cache_dir=cache_dir)
    scores, full = write_results(details, output)
    published = reference_scores(data_dir, resolved.name) if data_dir else {}
    rows = [
        {"task": t, "score": s, **({"published": published[t], "delta": s - published[t]} if t in published else {})}
        for t, s in main_scores(details).items()
    ]
    columns = ("task", "score", "published", "delta") if published else ("task", "score")
    print(
        f"\n{resolved.name} @ {resolved.revision}" + (f" (step {resolved.step})" if resolved.step is not None else "")
    )
    print(markdown_table(rows, columns), end="")
    print(
        f"{details['seconds']:.0f} s ({details['encode']['texts']} texts encoded at {details['encode']['texts_per_s']} texts/s)"
    )
    print(f"scores: {scores}\ndetails: {full}")
    return main_scores(details)


def main(argv: list[str]) -> dict[str, float]:
    """The command line of scripts/eval.py: key=value options; SystemExit with one message for bad ones."""
    cfg = parse(argv)
    try:
        return evaluate_model(
            cfg.model,
            data_dir=cfg.data_dir,
            tasks=cfg.tasks,
            output=cfg.output,
            revision=cfg.revision,
            checkpoint=cfg.checkpoint,
            batch_size=cfg.batch_size,
            cache_dir=cfg.cache_dir,
            truncate_dim=cfg.truncate_dim,
        )
    except EvalArgumentError as err:
        sys.exit(str(err))

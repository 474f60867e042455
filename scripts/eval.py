"""Evaluate a model on MTEB tasks with mteb's own evaluators; logic in gist/evaluation.py.

    python scripts/eval.py model=sentence-transformers/all-MiniLM-L6-v2 data_dir=data/mteb output=minilm.json
    python scripts/eval.py model=logs/quickstart/runs/<time> data_dir=data/mteb            # its exported model
    python scripts/eval.py model=logs/quickstart/runs/<time> checkpoint=last data_dir=data/mteb
    python scripts/eval.py model=<sentence-transformers folder> data_dir=data/mteb tasks=[STSBenchmark] output=x.json
    python scripts/eval.py model=BAAI/bge-small-en-v1.5 tasks=[STSBenchmark] output=x.json   # MTEB's hub data (online)

Options (key=value): model (run dir | sentence-transformers folder | hub id), revision (hub), checkpoint
(run dir: `last`, `best` or a checkpoint name; default: the exported model), data_dir (a folder of
task folders: `<Task>/<split>.jsonl` + meta.json; none: MTEB's hub tasks), tasks (list; default all
under data_dir), output (JSON {task: main score x 100}; `<stem>.details.json` beside it holds every
metric, the mteb version and the model's name/revision/step; default for a run dir:
`<run>/eval/<checkpoint file name or fine_tuned>.json`), batch_size, cache_dir (reuse per-task
results saved there, keyed by model name + revision, data digest, mteb version and protocol; default
none: everything is evaluated afresh).
Published scores in `<data_dir>/reference_scores.json` for the model are printed beside ours.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from gist.evaluation import evaluate, main_scores, markdown_table, reference_scores, resolve_model, write_results
from gist.mteb_tasks import hub_tasks, load_tasks
from gist.runs import is_run_dir, load_run

log = logging.getLogger("gist.eval")


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


def parse(argv: list[str]) -> EvalConfig:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
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


def default_output(cfg: EvalConfig) -> Path:
    if cfg.output:
        return Path(cfg.output)
    if is_run_dir(cfg.model):
        # Checkpoints are filed under their file name (as notebooks/compare_checkpoints.ipynb expects).
        label = load_run(cfg.model).checkpoint(cfg.checkpoint).label if cfg.checkpoint else "fine_tuned"
        return Path(cfg.model) / "eval" / f"{label}.json"
    sys.exit("output=<file.json> is required unless model is a run directory")


def main(argv: list[str]) -> dict[str, float]:
    cfg = parse(argv)
    output = default_output(cfg)
    # The original tasks (not `.v2`) are the ones the published numbers were computed on.
    warnings.filterwarnings("ignore", message=".*is superseded by.*")
    if cfg.data_dir:
        tasks = load_tasks(cfg.data_dir, cfg.tasks)
    elif cfg.tasks:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            sys.exit(f"tasks={cfg.tasks} without data_dir loads MTEB's data from the Hugging Face hub, but "
                     "HF_HUB_OFFLINE is set: unset it (with network access), or evaluate local task folders "
                     "with data_dir=data/mteb")
        tasks = hub_tasks(cfg.tasks)
    else:
        sys.exit("pass data_dir=<folder of task folders> (e.g. data/mteb) or tasks=[...] of MTEB's hub tasks")
    model = resolve_model(cfg.model, revision=cfg.revision, checkpoint=cfg.checkpoint)
    log.info("evaluating %s @ %s on %s", model.name, model.revision, [t.metadata.name for t in tasks])
    details = evaluate(model, tasks, batch_size=cfg.batch_size, cache_dir=cfg.cache_dir)
    scores, full = write_results(details, output)
    published = reference_scores(cfg.data_dir, model.name) if cfg.data_dir else {}
    rows = [{"task": t, "score": s, **({"published": published[t], "delta": s - published[t]} if t in published else {})}
            for t, s in main_scores(details).items()]
    columns = ("task", "score", "published", "delta") if published else ("task", "score")
    print(f"\n{model.name} @ {model.revision}" + (f" (step {model.step})" if model.step is not None else ""))
    print(markdown_table(rows, columns), end="")
    print(f"{details['seconds']:.0f} s ({details['encode']['texts']} texts encoded at {details['encode']['texts_per_s']} texts/s)")
    print(f"scores: {scores}\ndetails: {full}")
    return main_scores(details)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    main(sys.argv[1:])

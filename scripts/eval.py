"""Evaluate a model on MTEB tasks with mteb's own evaluators; logic in gist/evaluation/cli.py (the harness:
gist/evaluation/harness.py).

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
import sys

from gist.infra.hub import offline_unless_reachable

offline_unless_reachable()  # before transformers / datasets read HF_HUB_OFFLINE: no minutes of silent retries

from gist.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    main(sys.argv[1:])

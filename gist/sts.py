"""STS evaluation with the project's own encoder: cosine Spearman (x100), as MTEB's main STS score.

Used for validation-free reporting at the end of training (base vs fine-tuned on STSBenchmark test).
The full MTEB harness is scripts/eval.py.
"""

from __future__ import annotations

from pathlib import Path

from scipy.stats import spearmanr

from gist.data import read_sts
from gist.encoder import Encoder


def sts_spearman(encoder: Encoder, task_dir: str | Path, split: str = "test", batch_size: int = 64) -> float:
    """Spearman correlation x100 between cosine similarity and the gold scores of an STS split."""
    s1, s2, scores = read_sts(task_dir, split)
    e1 = encoder.encode(s1, batch_size=batch_size)
    e2 = encoder.encode(s2, batch_size=batch_size)
    return 100.0 * float(spearmanr((e1 * e2).sum(-1).numpy(), scores).statistic)

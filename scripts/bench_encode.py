"""Encoding throughput: gist's `Encoder.encode` (what the evaluation uses) vs `SentenceTransformer.encode`.

    python scripts/bench_encode.py                                   # all-MiniLM-L6-v2, batch 64
    python scripts/bench_encode.py --model sentence-transformers/all-mpnet-base-v2 --rounds 3

Texts: a seeded sample of the shipped test splits (the texts an evaluation encodes). The two encoders
alternate on the same chunks of texts (who goes first alternates too), so that load from other
processes on a shared machine hits both alike; each side's wall and CPU (all threads) seconds are
summed per round, and the ratio ours/ST is reported per round and overall.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    ("Banking77Classification", "text"),
    ("EmotionClassification", "text"),
    ("TweetSentimentExtractionClassification", "text"),
    ("STSBenchmark", "sentence1"),
)


def sample_texts(data_dir: Path, per_task: int, seed: int = 0) -> list[str]:
    texts = []
    for task, column in SOURCES:
        rows = [json.loads(line) for line in (data_dir / task / "test.jsonl").read_text().splitlines()]
        random.Random(seed).shuffle(rows)
        texts += [r[column] for r in rows[:per_task]]
    return texts


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    from sentence_transformers import SentenceTransformer

    from gist.core.encoder import Encoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "mteb"))
    parser.add_argument("--per-task", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=200, help="texts per alternation")
    args = parser.parse_args()

    texts = sample_texts(Path(args.data_dir), args.per_task)
    ours, st = Encoder(args.model).eval(), SentenceTransformer(args.model, device="cpu")
    diff = (ours.encode(texts[:64]) - torch.from_numpy(st.encode(texts[:64]))).abs().max().item()
    print(
        f"{args.model}: {len(texts)} texts, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"max |ours - ST| = {diff:.2e}"
    )
    chunks = [texts[i : i + args.chunk] for i in range(0, len(texts), args.chunk)]
    encoders = {
        "gist Encoder.encode": lambda t: ours.encode(t, batch_size=args.batch_size),
        "SentenceTransformer.encode": lambda t: st.encode(t, batch_size=args.batch_size),
    }
    totals = {name: [0.0, 0.0] for name in encoders}
    for r in range(args.rounds):
        per_round = {name: [0.0, 0.0] for name in encoders}
        for i, chunk in enumerate(chunks):
            names = list(encoders) if (r + i) % 2 == 0 else list(encoders)[::-1]
            for name in names:
                wall, cpu = timed(lambda name=name, chunk=chunk: encoders[name](chunk))
                per_round[name][0] += wall
                per_round[name][1] += cpu
        for name, (wall, cpu) in per_round.items():
            totals[name][0] += wall
            totals[name][1] += cpu
            print(
                f"round {r} {name:28s} {len(texts) / wall:7.1f} texts/s wall, {len(texts) / cpu:7.1f} texts/CPU-s",
                flush=True,
            )
    n = len(texts) * args.rounds
    for name, (wall, cpu) in totals.items():
        print(f"all   {name:28s} {n / wall:7.1f} texts/s wall, {n / cpu:7.1f} texts/CPU-s")
    (ow, oc), (sw, sc) = totals.values()
    print(f"throughput ours / ST: {sw / ow:.3f} (wall), {sc / oc:.3f} (CPU)")


if __name__ == "__main__":
    main()

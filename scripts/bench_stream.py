"""Peak memory of the training stream as the data grows: generate GIST-schema parquet shards of each size,
then iterate one full epoch of `SameTaskBatches` (optionally collating every k-th batch with a small
WordPiece tokenizer) in a fresh subprocess per size and report its peak RSS.

    python scripts/bench_stream.py                          # 200k and 2M rows, 1,100 tasks (~2.5 GB in /tmp)
    python scripts/bench_stream.py --rows 20000 200000 --collate-every 1
    python scripts/bench_stream.py --measure DIR ...        # (internal) one measurement, prints JSON

The data is written to a temporary folder (deleted afterwards unless --keep): shards of --shard-rows rows
with row groups of --row-group rows; each row's task is drawn from a Zipf-like distribution over --tasks
tasks, so every task's rows are scattered over the whole stream (the per-task buffers' worst case); text
lengths are log-normal around ~80 (query) and ~400 (pos/neg) characters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _vocab(rng, size: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {"".join(rng.choice(list(letters), size=int(rng.integers(2, 10)))) for _ in range(size * 2)}
    return sorted(words)[:size]


def generate(out: Path, rows: int, tasks: int, shard_rows: int, row_group: int, seed: int = 0) -> dict:
    """GIST-schema parquet shards in `out`; returns rows, shards and bytes written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = _vocab(rng)
    corpus = " ".join(np.asarray(vocab)[rng.zipf(1.3, size=4_000_000) % len(vocab)])
    task_p = 1.0 / np.arange(1, tasks + 1) ** 0.8
    task_p /= task_p.sum()
    task_names = np.asarray([f"task-{t:04d}" for t in range(tasks)])
    out.mkdir(parents=True, exist_ok=True)

    def texts(n: int, mean_chars: float) -> list[str]:
        lengths = np.clip(rng.lognormal(np.log(mean_chars), 0.6, size=n), 10, 8 * mean_chars).astype(int)
        starts = rng.integers(0, len(corpus) - lengths.max() - 1, size=n)
        return [corpus[s : s + n_] for s, n_ in zip(starts.tolist(), lengths.tolist())]

    shards, written, row = 0, 0, 0
    while row < rows:
        n = min(shard_rows, rows - row)
        path = out / f"train-{shards:05d}.parquet"
        with pq.ParquetWriter(
            path,
            pa.schema(
                [
                    ("query", pa.string()),
                    ("pos", pa.string()),
                    ("neg", pa.string()),
                    ("task_name", pa.string()),
                    ("query_instruct", pa.string()),
                    ("pos_instruct", pa.string()),
                    ("neg_instruct", pa.string()),
                    ("symmetric", pa.bool_()),
                ]
            ),
        ) as writer:
            for start in range(0, n, row_group):
                m = min(row_group, n - start)
                task = task_names[rng.choice(tasks, size=m, p=task_p)].tolist()
                writer.write_table(
                    pa.table(
                        {
                            "query": texts(m, 80),
                            "pos": texts(m, 400),
                            "neg": texts(m, 400),
                            "task_name": task,
                            "query_instruct": ["Represent the query for retrieval:"] * m,
                            "pos_instruct": ["Represent the document:"] * m,
                            "neg_instruct": ["Represent the document:"] * m,
                            "symmetric": [False] * m,
                        }
                    ),
                    row_group_size=row_group,
                )
        written += path.stat().st_size
        shards += 1
        row += n
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab]) + "\n")
    return {"rows": rows, "shards": shards, "bytes": written}


def _status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that over
    fork + exec, so a child would report its parent's (the data generator's) peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(data: Path, batch_size: int, shuffle_buffer: int, collate_every: int) -> dict:
    """One epoch of the stream over every shard in `data` (run in a fresh process)."""
    from gist.core.inputs import TextInputs
    from gist.data.batching import SameTaskBatches
    from gist.data.collate import Collator

    collator = None
    if collate_every:
        from transformers import BertTokenizerFast

        collator = Collator(TextInputs(BertTokenizerFast(vocab=str(data / "vocab.txt"), do_lower_case=True), 128))
    shards = sorted(data.glob("*.parquet"))
    stream = SameTaskBatches(shards, batch_size, seed=0, shuffle_buffer=shuffle_buffer)
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    batches = collated = 0
    for batch in stream:
        batches += 1
        if collator is not None and batches % collate_every == 0:
            collator(batch)
            collated += 1
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "rows": stream.stats["rows"],
        "batches": batches,
        "collated": collated,
        "seconds": round(seconds, 1),
        "rows_per_s": round(stream.stats["rows"] / seconds),
        "rss_after_imports_mib": round(base / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "peak_buffered_rows": stream.stats["peak_buffered_rows"],
        "leftover_rows": stream.stats["leftover_rows"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--tasks", type=int, default=1100)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--row-group", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=1024)
    parser.add_argument("--collate-every", type=int, default=0, help="collate (tokenize) every k-th batch; 0: never")
    parser.add_argument("--tmp", default=None, help="where to generate the data (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.batch_size, args.shuffle_buffer, args.collate_every)))
        return

    root = Path(tempfile.mkdtemp(prefix="bench_stream_", dir=args.tmp))
    results = []
    try:
        for rows in args.rows:
            data = root / f"rows{rows}"
            t0 = time.perf_counter()
            info = generate(data, rows, args.tasks, args.shard_rows, args.row_group)
            print(
                f"generated {rows:,} rows in {info['shards']} shards, {info['bytes'] / 2**20:.0f} MiB parquet, "
                f"{time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
            cmd = [
                sys.executable,
                __file__,
                "--measure",
                str(data),
                "--batch-size",
                str(args.batch_size),
                "--shuffle-buffer",
                str(args.shuffle_buffer),
                "--collate-every",
                str(args.collate_every),
            ]
            env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            result = {
                "data_rows": rows,
                "parquet_mib": round(info["bytes"] / 2**20),
                **json.loads(out.splitlines()[-1]),
            }
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
            if not args.keep:
                shutil.rmtree(data)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nbatch_size {args.batch_size}, shuffle_buffer {args.shuffle_buffer}, {args.tasks} tasks (scattered), "
        f"collate every {args.collate_every or '-'} batch(es)\n"
    )
    print("| rows | parquet MiB | batches | s | rows/s | RSS after imports MiB | peak RSS MiB | peak buffered rows |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['data_rows']:,} | {r['parquet_mib']} | {r['batches']:,} | {r['seconds']} | {r['rows_per_s']:,} | "
            f"{r['rss_after_imports_mib']} | {r['peak_rss_mib']} | {r['peak_buffered_rows']:,} |"
        )
    if len(results) > 1:
        lo, hi = min(r["peak_rss_mib"] for r in results), max(r["peak_rss_mib"] for r in results)
        print(f"\npeak RSS spread: {100 * (hi - lo) / lo:.1f}% (max vs min)")


if __name__ == "__main__":
    main()

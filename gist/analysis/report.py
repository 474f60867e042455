"""docs/RESULTS.md from an ablation sweep (gist/analysis/ablation.py): markdown tables and the whole document.

    from gist.analysis.ablation import load_sweep
    from gist.analysis.report import results_markdown
    text = results_markdown(sweep_dir, load_sweep(sweep_dir), reference_scores, notes=None, hardware="...",
                            figures=sweep_figures("docs/figures", sweep_dir.name, relative_to="docs"))

scripts/results.py writes it; notebooks/compare_checkpoints.ipynb shows the same tables and charts, and writes
the charts (SWEEP_FIGURES) that the document embeds.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from gist.analysis.ablation import (
    MEAN,
    Job,
    base_scores,
    best_of,
    noise_verdict,
    paired_difference,
    per_variant,
    scores_frame,
    sweep_wall,
    train_stats,
    variant_order,
    variant_settings,
)

PUBLISHED_BASE, PUBLISHED_GIST = "BAAI/bge-small-en-v1.5", "avsolatorio/GIST-small-Embedding-v0"

# (variant, reference): the comparisons the ablation exists for; pairs whose variants did not run are left out.
CONTRASTS = [
    ("gist_mpnet", "no_guide"),
    ("gist_minilm", "no_guide"),
    ("gist_mpnet", "gist_minilm"),
    ("gist_mpnet", "mnrl"),
    ("no_guide", "mnrl"),
    ("gist_mpnet_margin005", "gist_mpnet"),
    ("gist_mpnet_margin010", "gist_mpnet"),
    ("gist_mpnet_tau005", "gist_mpnet"),
]
GUIDE_VARIANTS = 4  # variants 1-4 of the issue: the guide/loss comparison, the rest are GIST settings
GUIDE_CONTRASTS = CONTRASTS[:5]  # the contrasts among variants 1-4 (the rest vary margin and temperature)
RETRIEVAL_TASKS = ("SciFact",)  # the shipped retrieval folders: "does the guide hurt retrieval?"

# The sweep's charts notebooks/compare_checkpoints.ipynb writes (file name: caption), in document order. Each
# PNG names the sweep it was drawn from in its `Source` text chunk (savefig(metadata=...)): a chart of
# another sweep left in the folder is never embedded under this sweep's tables.
SWEEP_FIGURES = {
    "ablation_scores.png": "Fine-tuned minus base model per task (mean ± std over seeds), one bar per variant; "
    "right, the share of candidate logits masked per variant.",
    "ablation_task_loss.png": "Training loss per training task (batches are same-task), each job's exponential "
    "moving average over that task's batches, coloured by variant.",
}
FIGURE_SOURCE = "Source"


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-0.00", "+0.00")


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def overview_table(scores: pd.DataFrame, base: dict[str, float], order: list[str]) -> str:
    """variant x task: mean ± std over seeds (fine-tuned, x100), with the base model's row first."""
    tasks = [t for t in base if t != MEAN] + [MEAN]
    per = per_variant(scores).set_index(["variant", "task"])
    rows = [["base (no fine-tuning)", *(f"{base[t]:.2f}" for t in tasks)]]
    for v in order:
        rows.append([v, *(_pm(per.loc[(v, t), "mean"], per.loc[(v, t), "std"]) for t in tasks)])
    return _table(["variant", *(_short(t) for t in tasks)], rows)


def _short(task: str) -> str:
    return task.removesuffix("Classification").replace("TweetSentimentExtraction", "TweetSentiment")


def task_table(
    scores: pd.DataFrame,
    base: dict[str, float],
    task: str,
    order: list[str],
    published: tuple[float, float] | None = None,
) -> str:
    """One task: each variant's mean ± std over seeds, its change from the base model and every seed."""
    per = per_variant(scores).set_index(["variant", "task"])
    rows = [["base (no fine-tuning)", f"{base[task]:.2f}", "", ""]]
    for v in order:
        seeds = scores[(scores.variant == v) & (scores.task == task)].sort_values("seed")
        mean, std = per.loc[(v, task), "mean"], per.loc[(v, task), "std"]
        rows.append([v, _pm(mean, std), _signed(mean - base[task]), " / ".join(f"{s:.2f}" for s in seeds.score)])
    if published is not None:
        before, after = published
        rows.append(
            [
                "published: bge-small-en-v1.5 -> GIST-small-Embedding-v0",
                f"{after:.2f}",
                f"{after - before:+.2f}",
                f"from {before:.2f}",
            ]
        )
    return _table(["variant", "score (mean ± std)", "vs base", "per seed"], rows)


def contrast_table(scores: pd.DataFrame, contrasts: list[tuple[str, str]]) -> str:
    """Paired-by-seed differences for each contrast: per task mean ± std and seeds won."""
    present = set(scores.variant)
    tasks = sorted(set(scores.task) - {MEAN}) + [MEAN]
    rows = []
    for variant, reference in contrasts:
        if variant not in present or reference not in present:
            continue
        diff = paired_difference(scores, variant, reference).set_index("task")
        cells = [
            f"{_signed(diff.loc[t, 'mean'])} ± {diff.loc[t, 'std']:.2f} ({int(diff.loc[t, 'wins'])}/{int(diff.loc[t, 'n'])})"
            for t in tasks
        ]
        rows.append([f"{variant} - {reference}", *cells])
    return _table(["difference", *(_short(t) for t in tasks)], rows)


def retrieval_table(scores: pd.DataFrame, base: dict, task: str, order: list[str]) -> str:
    """For one retrieval task: each guide contrast and each variant against the base, paired by seed, with
    the paired t statistic and the verdict against seed noise."""
    rows = []
    pivot = scores[scores.task == task].pivot(index="seed", columns="variant", values="score")
    for variant, reference in [c for c in GUIDE_CONTRASTS if c[0] in pivot and c[1] in pivot]:
        diff = (pivot[variant] - pivot[reference]).dropna()
        mean, t, verdict = noise_verdict(diff)
        rows.append([f"{variant} - {reference}", f"{_signed(mean)} ± {diff.std():.2f}", f"{t:.1f}", verdict])
    for variant in [v for v in order[:GUIDE_VARIANTS] if v in pivot]:
        diff = (pivot[variant] - base[task]).dropna()
        mean, t, verdict = noise_verdict(diff)
        rows.append([f"{variant} - base", f"{_signed(mean)} ± {diff.std():.2f}", f"{t:.1f}", verdict])
    return _table(["difference", "mean ± std over seed pairs", "t", "verdict (95 %)"], rows)


def train_table(jobs: list[Job], order: list[str]) -> str:
    stats = train_stats(jobs, order)

    def cell(v: str, name: str, digits: int) -> str:
        if (name, "mean") not in stats.columns or pd.isna(stats.loc[v, (name, "mean")]):
            return "-"
        mean, std = stats.loc[v, (name, "mean")], stats.loc[v, (name, "std")]
        return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    rows = [
        [
            v,
            cell(v, "train/masked_frac", 3),
            cell(v, "train/effective_negatives", 1),
            cell(v, "train/loss", 3),
            cell(v, "val/stsb_spearman", 4),
            cell(v, "wall_s", 0),
        ]
        for v in order
    ]
    return _table(
        ["variant", "masked fraction", "effective negatives", "train loss", "val Spearman (last)", "job wall time (s)"],
        rows,
    )


def sweep_command(sweep_dir: Path) -> str:
    file = sweep_dir / "multirun.yaml"
    overrides = yaml.safe_load(file.read_text())["hydra"]["overrides"]["task"] if file.is_file() else ["sweep=ablation"]
    return "python scripts/train.py -m " + " ".join(overrides)


def masking_table(rows: list[dict]) -> str:
    """scripts/guide_masking.py's rows -> task x (guide, margin): guide vetoes per anchor (effective negatives)."""
    columns = list(dict.fromkeys((r["guide"], r["margin"]) for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["task"], r["guide"], r["margin"]): r for r in rows}
    body = []
    for task in tasks:
        first = next(r for r in rows if r["task"] == task)
        body.append(
            [
                task,
                f"{int(first['candidates'])}",
                *(
                    f"{cell[(task, g, m)]['vetoes_per_anchor']:.2f} ({cell[(task, g, m)]['effective_negatives']:.1f})"
                    if (task, g, m) in cell
                    else "-"
                    for g, m in columns
                ),
            ]
        )
    return _table(["training task", "candidates C", *(f"{g}, margin {m:g}" for g, m in columns)], body, right_from=1)


def png_text(path: str | Path) -> dict[str, str]:
    """A PNG's tEXt chunks, {keyword: text} (matplotlib's `savefig(metadata=...)` writes them); {} for a file
    that is not a PNG. Read without an image library: rendering the document needs none."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return {}
    out, pos = {}, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"tEXt":
            key, _, value = data[pos + 8 : pos + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IEND":
            break
        pos += 12 + length  # length, type, data, CRC
    return out


def sweep_figures(figures_dir: str | Path, sweep_name: str, relative_to: str | Path) -> list[tuple[str, str]]:
    """(link, caption) of each SWEEP_FIGURES file in `figures_dir` drawn from the sweep `sweep_name` (its
    `Source` text), in SWEEP_FIGURES order; links relative to `relative_to`, the folder the document is
    written to. Missing figures, and figures of another sweep, are left out."""
    found = []
    for name, caption in SWEEP_FIGURES.items():
        path = Path(figures_dir) / name
        if path.is_file() and png_text(path).get(FIGURE_SOURCE) == sweep_name:
            found.append((Path(os.path.relpath(path, relative_to)).as_posix(), caption))
    return found


def figures_section(figures: list[tuple[str, str]]) -> list[str]:
    """Markdown lines embedding (link, caption) figures, or none."""
    if not figures:
        return []
    out = [
        "## Figures",
        "",
        "Drawn from this sweep's run folders by notebooks/compare_checkpoints.ipynb (its last section).",
        "",
    ]
    for link, caption in figures:
        out += [f"![{caption}]({link})", "", f"*{caption}*", ""]
    return out


def _recipe(cfg: dict) -> str:
    """One sentence on what every job trained: student, steps, batch, lr, and the data (from a job's config)."""
    data = cfg["data"]
    derived = data.get("derived") or []
    # Mined tasks: one MinedTriplets entry each (configs before the list form), or one mine_tasks list.
    mined = [Path(str(d["task_dir"])).name for d in derived if str(d.get("_target_", "")).endswith("MinedTriplets")]
    mined += [str(t) for d in derived if str(d.get("_target_", "")).endswith("mine_tasks") for t in d["tasks"]]
    pairs = [Path(str(d["task_dir"])).name for d in derived if str(d.get("_target_", "")).endswith("StsPairs")]
    parts = []
    if mined:
        mining = cfg.get("mining") or {}
        parts.append(
            f"GIST-mined triplets from the train splits of {', '.join(mined)} ({mining.get('max_texts')} texts "
            f"each, mined once with {mining.get('guide')})"
        )
    if pairs:
        parts.append(f"{', '.join(pairs)} train pairs with score >= {derived[-1].get('min_score')}")
    parts += [str(f) for f in data.get("train_files") or []] + [str(h) for h in data.get("hub_datasets") or []]
    return (
        f"student `{cfg['model']['name']}`, {cfg['trainer']['max_steps']} steps, batch size {data['batch_size']} "
        f"(same-task batches), lr {cfg['optim']['lr']} with {cfg['optim']['warmup_steps']} warm-up steps, on "
        f"{'; '.join(parts) or 'its training data'}."
    )


def results_markdown(
    sweep_dir: Path,
    jobs: list[Job],
    reference: dict,
    notes: str | None,
    hw: str,
    shown: str | None = None,
    masking: list[dict] | None = None,
    figures: list[tuple[str, str]] | None = None,
) -> str:
    """The whole of docs/RESULTS.md. reference: data/mteb/reference_scores.json's content (or {}); notes: the
    hand-written reading (or None); hw: the hardware line; shown: how to name the sweep folder; masking:
    scripts/guide_masking.py's JSON rows (or None); figures: (link, caption) to embed (sweep_figures, or None)."""
    sweep_dir = Path(sweep_dir)
    order = variant_order(jobs)
    scores = scores_frame(jobs)
    base = base_scores(jobs)
    tasks = [t for t in base if t != MEAN]
    first = jobs[0].config
    start, end = sweep_wall(jobs)
    wall = (
        f"{(end - start).total_seconds() / 60:.1f} min from the first job's start to the last job's end"
        if start and end
        else "not recorded"
    )
    walls = [j.wall_s for j in jobs if j.wall_s]
    published = reference.get("scores", {})
    pub_base, pub_gist = published.get(PUBLISHED_BASE, {}), published.get(PUBLISHED_GIST, {})
    n_seeds = scores.groupby("variant")["seed"].nunique()
    settings = variant_settings(jobs, order)

    out = [
        "# Ablation results: does the guide help, and how much?",
        "",
        f"<!-- Generated by `python scripts/results.py {shown or sweep_dir}`"
        " from the sweep's run folders: do not edit by hand (edit docs/RESULTS.notes.md or the script). -->",
        "",
        f"- **Command**: `{sweep_command(sweep_dir)}` (conf/sweep/ablation.yaml, variants in conf/ablation/), then "
        "`python scripts/results.py` to write this file.",
        f"- **Sweep**: `{sweep_dir.name}`: {len(jobs)} jobs, {len(order)} variants x seeds "
        f"{sorted(set(scores.seed))} ({', '.join(f'{v}: {n}' for v, n in n_seeds.items() if n != n_seeds.max()) or 'every variant complete'}).",
        f"- **Hardware** (the machine that ran the sweep and wrote this file): {hw}.",
        f"- **Wall time**: {wall}; one job (fit, export, {len(tasks)}-task evaluation of its model) "
        f"{min(walls):.0f}-{max(walls):.0f} s, mean {sum(walls) / len(walls):.0f} s."
        if walls
        else f"- **Wall time**: {wall}.",
        f"- **Recipe** (identical for every job): {_recipe(first)} The seed sets batch order and dropout; the "
        "data are the same for every job. Each job exports its final model (step "
        f"{first['trainer']['max_steps']}, no checkpoint selection) and evaluates it with scripts/eval.py's evaluator "
        "(gist.evaluation.harness, mteb's own task evaluators) on the test splits of the task folders in "
        f"`{Path(str(first.get('compare_tasks_dir'))).name}/`.",
        "- **Scores**: MTEB main score x 100 (STSBenchmark: Spearman of cosine similarity; classification: "
        "accuracy, AmazonCounterfactual en"
        + ("; SciFact retrieval: nDCG@10" if "SciFact" in tasks else "")
        + f"); `mean` is the mean over the {len(tasks)} tasks. Mean ± sample std over seeds.",
        "",
        "## Variants",
        "",
        _table(
            list(settings.columns), [[str(x) for x in row] for row in settings.itertuples(index=False)], right_from=9
        ),
        "",
        "## All tasks",
        "",
        overview_table(scores, base, order),
        "",
    ]
    if len(order) >= GUIDE_VARIANTS:
        best, best_mean = best_of(scores, order[:GUIDE_VARIANTS])
        out += [
            f"Best of variants 1-4 ({', '.join(order[:GUIDE_VARIANTS])}) by {len(tasks)}-task mean: **{best}** "
            f"({best_mean:.2f}; base {base[MEAN]:.2f}).",
            "",
        ]
    if pub_base and pub_gist:
        deltas = {t: pub_gist[t] - pub_base[t] for t in tasks if t in pub_base and t in pub_gist}
        out += [
            "For context, the published GIST-small-Embedding-v0 over its own base bge-small-en-v1.5 (model cards; "
            "302,500 steps of batch 16 over 1.82M MEDI + MTEB-classification triplets, guide UAE-Large-V1, 335M "
            "parameters; scores in data/mteb/reference_scores.json): "
            + ", ".join(f"{_short(t)} {d:+.2f}" for t, d in deltas.items())
            + ". Those deltas come from a far larger training run on a different student, so they indicate a direction, "
            "not a size to expect here.",
            "",
        ]
    out += [
        "## Paired differences",
        "",
        "Variant minus reference, paired by seed (the same seed gives both the same batches in the same order): "
        "mean ± std over the pairs, and (seeds where the variant is ahead / pairs).",
        "",
        contrast_table(scores, CONTRASTS),
        "",
    ]
    for task in [t for t in tasks if t in RETRIEVAL_TASKS]:
        out += [
            f"## Retrieval ({task}): does the guide hurt it?",
            "",
            "Guided minus unguided and fine-tuned minus base on the retrieval task, paired by seed; t = mean / (std "
            "/ sqrt(pairs)), and the verdict compares |t| with Student's t at 95 % (two-sided, pairs - 1 degrees "
            "of freedom: 4.30 for 3 seeds).",
            "",
            retrieval_table(scores, base, task, order),
            "",
        ]
    out += [
        "## Per task",
        "",
    ]
    for task in tasks:
        pub = (pub_base[task], pub_gist[task]) if task in pub_base and task in pub_gist else None
        out += [f"### {task}", "", task_table(scores, base, task, order, pub), ""]
    out += [
        "## Masking and training statistics",
        "",
        "Per variant, mean ± std over seeds of each run's mean over its logged steps (every 10th step). "
        "Masked fraction: share of the B x C candidate logits removed from the softmax, by the guide's vetoes "
        "and, in the 4-block losses (GIST, no guide), by masking each row's own anchor and positive in the aa/pp "
        "blocks: 2 of C per row even with no veto (B = 16: C = 64, 0.031, in triplet batches; C = 48, 0.042, in "
        "STSBenchmark pair batches). Effective negatives: unmasked non-target candidates per "
        "anchor. Training losses of different temperatures or candidate sets are not comparable.",
        "",
        train_table(jobs, order),
        "",
    ]
    if masking:
        out += [
            "## Where the guide masks",
            "",
            "Guide only, no training (`python scripts/guide_masking.py --output docs/guide_masking.json`): random "
            "same-task batches of 16 from the same training files, the mask gist_loss computes from the guide's "
            "cached embeddings. Per training task: guide vetoes per anchor beyond its own anchor and positive "
            "(effective negatives in brackets); slightly negative where the guide scores an anchor and its positive "
            "as high as a text with itself (near-identical pairs, float16 storage), so that the strict rule "
            "leaves the row's own anchor unmasked. The masked fractions of the table above mix these tasks in the "
            "proportions the stream drew them.",
            "",
            masking_table(masking),
            "",
        ]
    out += figures_section(figures or [])
    if notes:
        out += ["## Reading", "", notes.strip(), ""]
    return "\n".join(out)

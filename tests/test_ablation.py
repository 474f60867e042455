"""The ablation study (issue #7): variants compose to what they claim, gist/analysis/ablation.py aggregates a sweep's
run folders exactly (hand-computed), and scripts/results.py renders docs/RESULTS.md from a real tiny sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from gist.analysis import ablation as ab
from tests.helpers import CONF, load, make_fake_sweep, run_in_process, tiny, with_overrides, write_jsonl

# variant -> (loss class, guide, temperature, margin): what conf/ablation/<variant>.yaml must compose to.
EXPECTED = {
    "gist_mpnet": ("GISTLoss", "sentence-transformers/all-mpnet-base-v2", 0.01, 0.0),
    "gist_minilm": ("GISTLoss", "sentence-transformers/all-MiniLM-L6-v2", 0.01, 0.0),
    "no_guide": ("NoGuideLoss", None, 0.01, None),
    "mnrl": ("MNRLLoss", None, 0.05, None),
    "gist_mpnet_margin005": ("GISTLoss", "sentence-transformers/all-mpnet-base-v2", 0.01, 0.05),
    "gist_mpnet_margin010": ("GISTLoss", "sentence-transformers/all-mpnet-base-v2", 0.01, 0.1),
    "gist_mpnet_tau005": ("GISTLoss", "sentence-transformers/all-mpnet-base-v2", 0.05, 0.0),
}


@pytest.mark.unit
@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_each_variant_composes_to_its_loss_guide_temperature_and_margin(variant):
    cfg = load(["sweep=ablation", f"ablation={variant}"])
    loss, guide, temperature, margin = EXPECTED[variant]
    assert cfg.loss._target_ == f"gist.core.loss_modules.{loss}"
    assert (cfg.guide.name if cfg.guide else None) == guide
    assert cfg.loss.temperature == temperature
    assert cfg.loss.get("margin") == margin
    if margin is not None:
        assert cfg.loss.margin_strategy == "absolute"
    # Equal steps, batch and data for every variant: the quickstart recipe, final model, student MiniLM.
    assert (cfg.trainer.max_steps, cfg.data.batch_size, cfg.optim.lr) == (100, 16, 2e-5)
    assert cfg.trainer.val_check_interval == cfg.trainer.max_steps
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.mining.guide == "sentence-transformers/all-mpnet-base-v2"  # the data do not depend on the variant
    assert cfg.compare_tasks_dir.endswith("data/mteb") and cfg.task_name == "ablation"


@pytest.mark.unit
def test_the_sweep_runs_every_variant_file_with_three_seeds():
    """The variants are defined once, as the files of conf/ablation/: the sweep globs them (Hydra's own
    expansion, as the basic sweeper does it) and crosses them with three seeds."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = load(["sweep=ablation"]).hydra.sweeper.params
    parser = OverridesParser.create(config_loader=ConfigLoaderImpl(create_config_search_path(str(CONF))))
    (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]), None)
    assert sorted(EXPECTED) == sorted(p.stem for p in (CONF / "ablation").glob("*.yaml"))
    assert sorted(tuple(j) for j in jobs) == sorted((f"ablation={v}", f"seed={s}") for v in EXPECTED for s in (1, 2, 3))


@pytest.fixture()
def fake_sweep(tmp_path) -> Path:
    return make_fake_sweep(tmp_path)


@pytest.mark.unit
def test_aggregates_are_the_hand_computed_ones(fake_sweep):
    jobs = ab.load_sweep(fake_sweep)
    assert ab.variant_order(jobs) == ["gist_mpnet", "no_guide"]
    scores = ab.scores_frame(jobs)
    per = ab.per_variant(scores).set_index(["variant", "task"])
    assert per.loc[("gist_mpnet", "T1"), "mean"] == pytest.approx(82.0)
    assert per.loc[("gist_mpnet", "T1"), "std"] == pytest.approx(2.0)  # sample std of 80, 82, 84
    assert per.loc[("gist_mpnet", "mean"), "mean"] == pytest.approx((70 + 71.5 + 74.5) / 3)  # seed means 70, 71.5, 74.5
    assert per.loc[("no_guide", "T2"), "std"] == pytest.approx(
        math.sqrt(((60 - 62.333333) ** 2 + (62 - 62.333333) ** 2 + (65 - 62.333333) ** 2) / 2)
    )
    diff = ab.paired_difference(scores, "gist_mpnet", "no_guide").set_index("task")
    # T1: 80-79, 82-80, 84-84 = 1, 2, 0 -> mean 1, std 1, ahead in 2 of 3 seeds
    assert (
        diff.loc["T1", "mean"],
        diff.loc["T1", "std"],
        diff.loc["T1", "wins"],
        diff.loc["T1", "n"],
    ) == pytest.approx((1.0, 1.0, 2, 3))
    assert (diff.loc["T2", "mean"], diff.loc["T2", "wins"]) == pytest.approx((-1 / 3, 0))  # 0, -1, 0
    assert ab.best_of(scores, ["gist_mpnet", "no_guide"]) == ("gist_mpnet", pytest.approx(72.0))
    assert ab.base_scores(jobs) == {"T1": 70.0, "T2": 50.0, "mean": 60.0}
    stats = ab.train_stats(jobs, ["gist_mpnet", "no_guide"])
    # seed s logs masked fractions 0.1 s and 0.3 s -> run mean 0.2 s; over seeds 1, 2, 3: 0.4 ± 0.2
    assert stats.loc["gist_mpnet", ("train/masked_frac", "mean")] == pytest.approx(0.4)
    assert stats.loc["gist_mpnet", ("train/masked_frac", "std")] == pytest.approx(0.2)
    assert stats.loc["gist_mpnet", ("wall_s", "mean")] == pytest.approx(30.0)  # .hydra/ written -> eval/ written


@pytest.mark.unit
def test_an_unfinished_job_is_named_and_can_be_skipped(fake_sweep):
    (fake_sweep / "4" / "eval" / "fine_tuned.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"4: no eval/fine_tuned.json"):
        ab.load_sweep(fake_sweep)
    assert len(ab.load_sweep(fake_sweep, allow_incomplete=True)) == 5


@pytest.mark.unit
def test_base_scores_that_differ_between_jobs_are_an_error(fake_sweep):
    (fake_sweep / "3" / "eval" / "base.json").write_text(json.dumps({"T1": 70.5, "T2": 50.0}))
    with pytest.raises(ValueError, match="base-model scores differ"):
        ab.base_scores(ab.load_sweep(fake_sweep))


@pytest.mark.unit
def test_results_markdown_is_rendered_from_the_sweeps_folders(fake_sweep, tmp_path):
    """scripts/results.py's document (gist.analysis.results.write_results) on the hand-picked sweep:
    every table cell is one of the hand-computed numbers, the notes are inserted as written."""
    from gist.analysis.results import write_results

    notes = tmp_path / "notes.md"
    notes.write_text("Hand-written reading goes here.\n")
    out = tmp_path / "docs" / "RESULTS.md"
    jobs = write_results(fake_sweep, out, notes=notes, hardware_line="a test machine")
    assert [(j.variant, j.seed) for j in jobs] == [(v, s) for v in ("gist_mpnet", "no_guide") for s in (1, 2, 3)]
    text = out.read_text()
    for row in (
        "| base (no fine-tuning) | 70.00 | 50.00 | 60.00 |",
        "| gist_mpnet | 82.00 ± 2.00 | 62.00 ± 2.65 | 72.00 ± 2.29 |",
        "| gist_mpnet - no_guide | +1.00 ± 1.00 (2/3) | -0.33 ± 0.58 (0/3) | +0.33 ± 0.29 (2/3) |",
        "| gist_mpnet | 82.00 ± 2.00 | +12.00 | 80.00 / 82.00 / 84.00 |",
        "| gist_mpnet | 0.400 ± 0.200 | 36.0 ± 2.0 |",
    ):
        assert row in text, row
    assert "a test machine" in text and "6 jobs, 2 variants x seeds [1, 2, 3]" in text
    assert text.rstrip().endswith("Hand-written reading goes here.")


@pytest.mark.unit
def test_retrieval_section_says_whether_an_effect_is_beyond_seed_noise(tmp_path):
    """With a retrieval task (SciFact) the document answers "does the guide hurt retrieval?": paired
    differences, t = mean / (std / sqrt 3), compared with Student's t at 95 % and 2 df (4.303). Hand-computed:
    gist_mpnet - no_guide = 1, 2, 0 -> +1.00 ± 1.00, t 1.7; gist_mpnet - base = 10, 12, 14 -> t 10.4."""
    from gist.analysis.results import write_results

    sweep = make_fake_sweep(tmp_path, first_task="SciFact")
    out = tmp_path / "RESULTS.md"
    write_results(sweep, out, hardware_line="a test machine")
    text = out.read_text()
    assert "## Retrieval (SciFact): does the guide hurt it?" in text and "SciFact retrieval: nDCG@10" in text
    for row in (
        "| gist_mpnet - no_guide | +1.00 ± 1.00 | 1.7 | within seed noise |",
        "| gist_mpnet - base | +12.00 ± 2.00 | 10.4 | beyond seed noise |",
        "| no_guide - base | +11.00 ± 2.65 | 7.2 | beyond seed noise |",
    ):
        assert row in text, row
    assert ab.noise_verdict(pd.Series([1.0, 2.0]))[2] == "too few seeds"


@pytest.mark.slow  # the default tier: the same document from hand-made run folders (above), and multiruns in test_sweeps.py
def test_results_on_a_tiny_real_sweep(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, monkeypatch):
    """`-m sweep=ablation` restricted to two guided variants x two seeds, with tiny BERTs and the tiny task
    folders as compare_tasks_dir; then gist.analysis.results (scripts/results.py) renders RESULTS.md from its run folders."""
    from gist.analysis.results import write_results

    args = with_overrides(["-m", "sweep=ablation"], tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir))
    args = with_overrides(
        args, ["ablation=gist_mpnet,gist_mpnet_margin010", "seed=1,2", f"compare_tasks_dir={mteb_dir}"]
    )
    run_in_process(args, monkeypatch)
    (sweep,) = (tmp_path / "logs" / "ablation" / "multiruns").iterdir()
    assert sweep.name.endswith("_ablation")
    jobs = ab.load_sweep(sweep)
    assert sorted((j.variant, j.seed) for j in jobs) == [
        ("gist_mpnet", 1),
        ("gist_mpnet", 2),
        ("gist_mpnet_margin010", 1),
        ("gist_mpnet_margin010", 2),
    ]
    out = tmp_path / "RESULTS.md"
    notes = tmp_path / "notes.md"
    notes.write_text("Hand-written reading goes here.\n")
    written = write_results(sweep, out, notes=notes, hardware_line="a test machine")
    assert [j.path for j in written] == [j.path for j in jobs]
    text = out.read_text()
    # Every number comes from the run folders: recompute two cells independently of gist/analysis/ablation.py.
    task = "TinySTS"
    runs = {(j.variant, j.seed): json.loads((j.path / "eval" / "fine_tuned.json").read_text())[task] for j in jobs}
    mean = (runs[("gist_mpnet", 1)] + runs[("gist_mpnet", 2)]) / 2
    assert f"| gist_mpnet | {mean:.2f} ± " in text
    diff = [runs[("gist_mpnet_margin010", s)] - runs[("gist_mpnet", s)] for s in (1, 2)]
    assert f"| gist_mpnet_margin010 - gist_mpnet | {sum(diff) / 2:+.2f} ± " in text
    base = json.loads((jobs[0].path / "eval" / "base.json").read_text())[task]
    assert f"| base (no fine-tuning) | {base:.2f} |" in text
    assert "### TinySTS" in text and "### TinyTopicClassification" in text
    assert "Hand-written reading goes here." in text
    assert "python scripts/train.py -m sweep=ablation" in text


@pytest.mark.unit
def test_results_command_names_a_missing_sweep(tmp_path, capsys):
    from gist.analysis.results import main

    assert main([str(tmp_path / "nope"), "--output", str(tmp_path / "x.md")]) == 1
    assert "nope: no such sweep folder" in capsys.readouterr().err
    assert main(["--log-dir", str(tmp_path), "--output", str(tmp_path / "x.md")]) == 1
    assert f"no ablation sweep under {tmp_path}/ablation/multiruns" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_guide_masking_counts_what_the_loss_masks(tmp_path, tiny_guide, capsys):
    """Margin 0: the guide masks its own anchor/positive at least; margin 2 (absolute): every candidate
    but the target (cosines > t_i - 2 always), i.e. C - 1 of C and no effective negative. Through the
    command line of scripts/guide_masking.py (gist.analysis.masking.main)."""
    from gist.analysis.masking import main as masking_main

    rows = [
        {"query": f"anchor text {i}", "pos": f"positive words {i}", "neg": f"negative thing {i}"} for i in range(12)
    ]
    pairs = [{"query": f"left {i}", "pos": f"right {i}"} for i in range(12)]
    files = [
        write_jsonl(tmp_path / "mteb-toy-avs_triplets-0123.jsonl", rows),
        write_jsonl(tmp_path / "pairs-0123.jsonl", pairs),
    ]
    out = tmp_path / "masking.json"
    assert (
        masking_main(
            [
                "--files",
                *map(str, files),
                "--guides",
                str(tiny_guide),
                "--margins",
                "0",
                "2",
                "--batches",
                "3",
                "--batch-size",
                "4",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    got = {(r["task"], r["margin"]): r for r in json.loads(out.read_text())}
    assert set(got) == {("toy", 0.0), ("toy", 2.0), ("pairs", 0.0), ("pairs", 2.0)}
    assert got[("toy", 2.0)]["candidates"] == 16 and got[("pairs", 2.0)]["candidates"] == 12  # 4B and 3B, B = 4
    for task, C in (("toy", 16), ("pairs", 12)):
        assert got[(task, 2.0)]["effective_negatives"] == 0
        assert got[(task, 2.0)]["masked_frac"] == pytest.approx((C - 1) / C)
        assert got[(task, 2.0)]["vetoes_per_anchor"] == pytest.approx(C - 3)
        assert got[(task, 0.0)]["masked_frac"] <= got[(task, 2.0)]["masked_frac"]
    assert "| guide | toy | 2.000 | 12 | 13.000 | 0.938 | 0.000 | 16.000 |" in capsys.readouterr().out
    # The RESULTS.md section made from this JSON: per task, vetoes per anchor (effective negatives) per guide x margin.
    from gist.analysis.report import masking_table

    table = masking_table(json.loads(out.read_text()))
    assert "| training task | candidates C | guide, margin 0 | guide, margin 2 |" in table
    assert "| toy | 16 | " in table and "| 13.00 (0.0) |" in table

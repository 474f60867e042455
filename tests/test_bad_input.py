"""Bad training input: by default the run stops before training with an error naming the source, the
row and the problem; `data.on_bad_row=skip` drops bad rows and counts them per reason."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gist.data.datamodule import GISTDataModule
from gist.data.records import DataError, HubDataset, iter_rows, validate_sources
from tests.helpers import run_in_process, write_jsonl

# (raw line, reason, words of the message)
BAD_LINES = [
    (b'{"query": "q", "pos": "p"', "malformed_json", "malformed JSON"),
    (b'{"pos": "p", "task_name": "task-a", "neg": "n"}', "missing_column", "missing column 'query'"),
    (b'{"query": "q", "pos": "p", "neg": "n"}', "missing_column", "missing column 'task_name'"),
    (b'{"query": 3, "pos": "p", "neg": "n", "task_name": "task-a"}', "wrong_type", "'query' must be a string, got int"),
    (
        b'{"query": "q", "pos": ["p"], "neg": "n", "task_name": "task-a"}',
        "wrong_type",
        "'pos' must be a string, got list",
    ),
    (
        b'{"query": "q", "pos": "p", "neg": "n", "task_name": "task-a", "symmetric": "yes"}',
        "wrong_type",
        "'symmetric' must be a boolean",
    ),
    (
        b'{"query": "", "pos": "p", "neg": "n", "task_name": "task-a"}',
        "empty_text",
        "'query' is empty or whitespace-only",
    ),
    (
        b'{"query": "q", "pos": " \\t\\n ", "neg": "n", "task_name": "task-a"}',
        "empty_text",
        "'pos' is empty or whitespace-only",
    ),
    (b'{"query": "q\xff\xfe", "pos": "p", "task_name": "task-a"}', "invalid_utf8", "invalid UTF-8"),
    (b'["q", "p"]', "not_an_object", "expected a JSON object, got list"),
    (b'{"query": "q", "pos": "p", "task_name": "task-a"}', "inconsistent_negatives", "task 'task-a' lacks a 'neg'"),
]


def _dirty_file(tmp_path: Path, gist_rows: list[dict], bad: list[bytes], name="dirty.jsonl") -> Path:
    """gist_rows[:6], then the bad lines (rows 7, 8, ...), then the rest of gist_rows."""
    path = tmp_path / name
    good = [json.dumps(r).encode() for r in gist_rows]
    path.write_bytes(b"\n".join(good[:6] + bad + good[6:]) + b"\n")
    return path


@pytest.mark.unit
@pytest.mark.parametrize("line,reason,problem", BAD_LINES, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_LINES)])
def test_each_bad_row_stops_with_source_row_and_problem_or_is_skipped_and_counted(
    tmp_path, gist_rows, line, reason, problem
):
    path = _dirty_file(tmp_path, gist_rows, [line])
    with pytest.raises(DataError) as err:
        validate_sources([path])
    assert str(err.value).startswith(f"{path}: row 7: ") and problem in str(err.value)
    assert err.value.reason == reason
    skipped = Counter()
    counts = validate_sources([path], on_bad_row="skip", skipped=skipped)
    assert skipped == {reason: 1}
    assert sum(counts.values()) == len(gist_rows)  # every good row kept
    rows = list(iter_rows([path], on_bad_row="skip"))
    assert [r["query"] for r in rows] == [r["query"] for r in gist_rows]


@pytest.mark.unit
def test_skip_counts_every_reason_in_one_file(tmp_path, gist_rows):
    path = _dirty_file(tmp_path, gist_rows, [line for line, _, _ in BAD_LINES])
    skipped = Counter()
    validate_sources([path], on_bad_row="skip", skipped=skipped)
    assert skipped == Counter(reason for _, reason, _ in BAD_LINES)


@pytest.mark.unit
def test_a_task_with_one_row_is_an_error_or_skipped(tmp_path, gist_rows):
    rows = gist_rows + [dict(gist_rows[0], task_name="lonely", query="only row")]
    path = write_jsonl(tmp_path / "lonely.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}: row {len(rows)}: task 'lonely' has only this one row") as err:
        validate_sources([path])
    assert err.value.reason == "single_row_task"
    skipped = Counter()
    counts = validate_sources([path], on_bad_row="skip", skipped=skipped)
    assert "lonely" not in counts and skipped == {"single_row_task": 1}


@pytest.mark.unit
def test_unreadable_files_are_named(tmp_path, gist_rows, monkeypatch):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=rf"{corrupt}: cannot be read as parquet"):
        validate_sources([corrupt])
    # A file the process may not read (running as root, chmod would not stop us: fail the open).
    locked = write_jsonl(tmp_path / "locked.jsonl", gist_rows)
    real_open = Path.open

    def guarded(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded)
    with pytest.raises(DataError, match=rf"{locked}: cannot be read: PermissionError"):
        validate_sources([locked], on_bad_row="skip")  # a whole source is never skipped
    with pytest.raises(DataError, match="not found"):
        validate_sources([tmp_path / "missing.jsonl"], on_bad_row="skip")


@pytest.mark.unit
@pytest.mark.parametrize("error", ["dataset", "revision"])
def test_unknown_hub_dataset_or_revision_fails_in_check_sources(monkeypatch, error):
    import datasets
    from huggingface_hub.errors import RevisionNotFoundError

    def fake_load(path, name=None, revision=None, split=None, streaming=False):
        if error == "dataset":
            raise datasets.exceptions.DatasetNotFoundError(
                f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed."
            )
        import httpx

        url = f"https://huggingface.co/api/datasets/{path}/revision/{revision}"
        response = httpx.Response(404, request=httpx.Request("GET", url))
        raise RevisionNotFoundError(f"Revision Not Found for url: {url}.", response=response)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dm = GISTDataModule(hub_datasets=[{"path": "org/nope", "revision": "deadbeef"}], val_sts_dir=None)
    with pytest.raises(DataError) as err:
        dm.check_sources()
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"{HubDataset('org/nope', 'deadbeef')}: cannot be opened: ")
    assert ("DatasetNotFoundError" if error == "dataset" else "RevisionNotFoundError") in first


@pytest.mark.unit
def test_check_sources_reads_every_row_before_any_model_loads(tmp_path, gist_rows):
    path = _dirty_file(tmp_path, gist_rows, [BAD_LINES[0][0]])
    with pytest.raises(DataError, match=rf"{path}: row 7: malformed JSON"):
        GISTDataModule(train_files=[str(path)], val_sts_dir=None).check_sources()
    dm = GISTDataModule(train_files=[str(path)], val_sts_dir=None, on_bad_row="skip")
    dm.check_sources()
    assert dm.bad_rows == {"malformed_json": 1}
    with pytest.raises(ValueError, match="on_bad_row"):
        GISTDataModule(train_files=[str(path)], on_bad_row="ignore")


def test_skip_trains_and_reports_counts_in_the_run_dir_and_metrics(tmp_path, tiny_student, gist_rows, mteb_dir):
    from gist.train import train
    from tests.helpers import assert_metric, assert_run_files, tiny_cfg

    path = _dirty_file(tmp_path, gist_rows, [line for line, _, _ in BAD_LINES])
    cfg = tiny_cfg(
        tmp_path,
        tiny_student,
        None,
        path,
        mteb_dir,
        [
            "guide=none",
            "loss=mnrl",
            "data.on_bad_row=skip",
            "export=false",
            "compare_tasks_dir=null",
            "trainer.max_steps=3",
        ],
    )
    assert_metric(train(cfg))
    run = Path(cfg.paths.output_dir)
    assert_run_files(run, model=False)
    report = json.loads((run / "bad_rows.json").read_text())
    assert report["skipped_rows"] == len(BAD_LINES)
    assert report["by_reason"] == dict(Counter(reason for _, reason, _ in BAD_LINES))
    header, *rows = (run / "csv" / "metrics.csv").read_text().splitlines()
    col = header.split(",").index("data/skipped_rows")
    assert any(r.split(",")[col] == f"{float(len(BAD_LINES))}" for r in rows)


def test_train_script_prints_one_clean_line_and_exits_non_zero(tmp_path, gist_rows, tiny_student, monkeypatch, capsys):
    """scripts/train.py (its Hydra entry point, in this process): a DataError is one `error:` line on
    stderr and exit status 1, no traceback, before any model loads."""
    path = _dirty_file(tmp_path, gist_rows, [BAD_LINES[3][0]])
    monkeypatch.setattr("gist.core.encoder.Encoder.__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        run_in_process(
            [
                "data=files",
                f"data.train_files=[{path}]",
                "data.val_sts_dir=null",
                f"model.name={tiny_student}",
                "guide=none",
                "loss=mnrl",
                "logger=csv",
                "compare_tasks_dir=null",
                f"hydra.run.dir={tmp_path / 'run'}",
                f"paths.cache_dir={tmp_path / 'cache'}",
            ],
            monkeypatch,
        )
    assert stop.value.code == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {path}: row 7: column 'query' must be a string, got int"]

"""Training sources and how they mix: `SourceSpec` (a source plus its weight / max_rows / rows),
`source_spec` (builds one from a path, a `HubDataset` or a Hydra dict) and `mixture_probabilities`
(per-source sampling probabilities from weights or a temperature; `count_rows` sizes local files).

    specs = [source_spec("a.jsonl"), source_spec({"hub": "org/data", "revision": "abc", "weight": 2.0})]
    probabilities = mixture_probabilities(specs)  # None: sources are read one after another

A source itself is a local file path or a `gist.data.records.HubDataset`; both are read row by row by
gist.data.records (`iter_records` / `iter_rows`), which this module builds on (records never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gist.data.records import DataError, HubDataset, Source


@dataclass(frozen=True)
class SourceSpec:
    """One source of the training mixture.

    weight: relative probability of drawing the next row from this source (all sources weighted, or none).
    max_rows: use only the first `max_rows` rows of the source (a prefix: the stream is never read past it).
    rows: the source's row count, for temperature sampling where it cannot be read cheaply (hub datasets).
    """

    source: Source
    weight: float | None = None
    max_rows: int | None = None
    rows: int | None = None

    def __post_init__(self) -> None:
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"{self.source}: weight must be > 0, got {self.weight}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"{self.source}: max_rows must be >= 1, got {self.max_rows}")
        if self.rows is not None and self.rows < 0:
            raise ValueError(f"{self.source}: rows must be >= 0, got {self.rows}")

    def __str__(self) -> str:
        return str(self.source)


def source_spec(entry: object) -> SourceSpec:
    """A SourceSpec from a path, a HubDataset, or a Hydra dict {path: file} / {hub: id, revision, split,
    name} plus optional weight, max_rows, rows."""
    if isinstance(entry, SourceSpec):
        return entry
    if isinstance(entry, HubDataset):
        return SourceSpec(entry)
    if isinstance(entry, (str, Path)):
        return SourceSpec(Path(entry))
    entry = dict(entry)  # a dict or an omegaconf DictConfig
    known = {"path", "hub", "revision", "split", "name", "weight", "max_rows", "rows"}
    if set(entry) - known or ("path" in entry) == ("hub" in entry):
        raise ValueError(
            f"data source {entry}: give exactly one of `path` (a local file) or `hub` (a dataset id, with "
            f"revision/split/name), plus optional weight, max_rows, rows; unknown keys: {sorted(set(entry) - known)}"
        )
    extra = {k: entry[k] for k in ("weight", "max_rows", "rows") if entry.get(k) is not None}
    if "path" in entry:
        return SourceSpec(Path(entry["path"]), **extra)
    hub = {k: entry[k] for k in ("revision", "split", "name") if entry.get(k) is not None}
    return SourceSpec(HubDataset(entry["hub"], **hub), **extra)


def count_rows(source: Source) -> int:
    """Rows of a local source without parsing it (parquet: footer metadata; jsonl: non-blank lines)."""
    if isinstance(source, HubDataset):
        raise DataError(f"{source}: its row count is unknown; give `rows: N` for temperature sampling")
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: training file not found (or not a file)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def mixture_probabilities(specs: list[SourceSpec], temperature: float | None = None) -> list[float] | None:
    """Per-source sampling probabilities: the normalised weights, or p_i ∝ n_i^(1/T) with n_i the source's
    rows (capped by max_rows) when `temperature` T is set; None (sources read one after another) when
    neither is given."""
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and temperature is not None:
        raise ValueError("give either per-source weights or a sampling temperature, not both")
    if any(weighted) and not all(weighted):
        raise ValueError(
            f"either every source has a weight or none: missing for {[str(s) for s in specs if s.weight is None]}"
        )
    if all(weighted) and specs:
        raw = [float(s.weight) for s in specs]
    elif temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        sizes = [s.rows if s.rows is not None else count_rows(s.source) for s in specs]
        sizes = [min(n, s.max_rows) if s.max_rows is not None else n for n, s in zip(sizes, specs)]
        for n, s in zip(sizes, specs):
            if n == 0:
                raise DataError(f"{s}: no rows")
        raw = [n ** (1.0 / temperature) for n in sizes]
    else:
        return None
    total = sum(raw)
    return [w / total for w in raw]

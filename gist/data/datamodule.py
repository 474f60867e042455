"""LightningDataModule: same-task GIST batches for training, an STS split for validation.

Training sources, read in this order: `train_files` (jsonl/parquet), `hub_datasets` (streamed),
`sources` (files or hub datasets with optional weight / max_rows) and `derived` sources (objects with
`materialize(cache_dir) -> path`, e.g. mined classification triplets, built once and cached on disk).
See gist/data/batching.py (`SameTaskBatches`) for the batching and memory policies, gist/data/sources.py
for mixing, and gist/data/collate.py for the batches a step receives (`TrainBatch`, `StsBatch`).

Exact resume: every training batch carries its (epoch, index) in the stream; the datamodule records
the last one trained (`on_before_batch_transfer`, main process) and saves it in Lightning checkpoints
(`state_dict` / `load_state_dict`); a resumed run replays the stream to that point without collating.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from gist.core.encoder import inference_device
from gist.data.batching import SameTaskBatches
from gist.data.collate import Collator, StsCollator, TrainBatch
from gist.data.records import (
    DataError,
    HubDataset,
    iter_rows,
    open_hub_dataset,
    read_sts,
    validate_sources,
)
from gist.data.sources import SourceSpec, source_spec

log = logging.getLogger(__name__)


class GISTDataModule(LightningDataModule):
    """Args:
    train_files: local GIST-schema .jsonl / .parquet files.
    hub_datasets: dicts {path, revision, split, name} of hub datasets to stream.
    sources: more sources as dicts: {path: file} or {hub: id, revision, split, name}, each with optional
        weight (relative sampling probability; all sources weighted or none), max_rows (use the first
        max_rows rows only) and rows (row count of a hub dataset, for temperature sampling).
    temperature: sample sources with p_i ∝ n_i^(1/T) (n_i = rows, capped by max_rows); None with no
        weights: sources are read one after another.
    leftovers: "drop" (default) or "emit" a task's last partial batch of an epoch.
    max_buffered_rows: cap on rows held in partial per-task buffers (None: tasks x (global batch - 1)).
    derived: objects with `materialize(cache_dir) -> Path` (gist.data.mining.MinedTriplets, StsPairs).
    cache_dir: where derived sources are written.
    batch_size: rows per (same-task) batch, per device.
    seed: seed of the batch shuffle.
    shuffle_buffer: batches held in the shuffle pool.
    validate_files: read local files once before training so a bad row stops the run early
        (`check_sources` reads train_files before any model loads; `setup` reads derived files).
    on_bad_row: "error" (default): a bad row stops the run with a DataError naming source, row and
        problem; "skip": bad rows are left out and counted per reason in `bad_rows` (logged, and
        written to <run_dir>/bad_rows.json by scripts/train.py).
    val_sts_dir / val_split / val_batch_size: the STS split used for validation (None: no validation).
    num_workers: DataLoader workers (batches are sharded among them).
    """

    def __init__(
        self,
        train_files: Sequence[str] = (),
        hub_datasets: Sequence[dict] = (),
        sources: Sequence[dict] = (),
        derived: Sequence[object] = (),
        cache_dir: str = ".cache",
        batch_size: int = 16,
        seed: int = 42,
        shuffle_buffer: int = 1024,
        validate_files: bool = True,
        on_bad_row: str = "error",
        val_sts_dir: str | None = None,
        val_split: str = "validation",
        val_batch_size: int = 64,
        num_workers: int = 0,
        temperature: float | None = None,
        leftovers: str = "drop",
        max_buffered_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.train_files = [Path(f) for f in train_files]
        self.hub_datasets = [HubDataset(**dict(h)) for h in hub_datasets]
        self.source_specs = [source_spec(s) for s in sources]
        # An entry may be a list of sources (gist.data.mining.mine_tasks): flattened in order.
        # (Hydra hands such a list over as a ListConfig of objects: anything without `materialize` is a list.)
        self.derived = [s for entry in derived for s in ([entry] if hasattr(entry, "materialize") else list(entry))]
        if not (self.train_files or self.hub_datasets or self.source_specs or self.derived):
            raise ValueError("no training data: set data.train_files, data.hub_datasets, data.sources or data.derived")
        self.temperature, self.leftovers, self.max_buffered_rows = temperature, leftovers, max_buffered_rows
        self._stream_state: dict | None = None  # from a checkpoint, applied to the training stream
        self.cache_dir = Path(cache_dir)
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.validate_files = validate_files
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.bad_rows: Counter = Counter()  # reason -> rows skipped (on_bad_row=skip), local sources
        self._validated: dict[str, int] | None = None
        self._validated_paths: list[Path] = []
        self.val_sts_dir, self.val_split, self.val_batch_size = val_sts_dir, val_split, val_batch_size
        self.num_workers = num_workers
        self.collator: Collator | None = None
        self._prefill = None
        self.sts_collator: StsCollator | None = None
        self.task_counts: dict[str, int] = {}

    def check_sources(self) -> None:
        """Fail fast, before any model loads: files exist and (validate_files) every row of the local
        training files is valid, hub datasets resolve, the STS split exists. Raises DataError."""
        local = [*self.train_files, *(s.source for s in self.source_specs if not isinstance(s.source, HubDataset))]
        for path in local:
            if not path.is_file():
                raise DataError(f"{path}: training file not found")
        for hub in [*self.hub_datasets, *(s.source for s in self.source_specs if isinstance(s.source, HubDataset))]:
            open_hub_dataset(hub)
        if self.val_sts_dir is not None and not (Path(self.val_sts_dir) / f"{self.val_split}.jsonl").is_file():
            raise DataError(f"{Path(self.val_sts_dir) / f'{self.val_split}.jsonl'}: validation split not found")
        if self.validate_files and local:
            self._validated_paths = local
            self._validated = self._validate(local)

    def _validate(self, sources: list) -> dict[str, int]:
        skipped: Counter = Counter()
        counts = validate_sources(sources, on_bad_row=self.on_bad_row, skipped=skipped)
        if skipped:
            self.bad_rows.update(skipped)
            log.warning(
                "skipped bad rows (data.on_bad_row=skip) in %s: %s",
                ", ".join(map(str, sources)),
                ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())),
            )
        return counts

    def configure_encoders(self, student, guide=None, guide_cache=None, prefill_guide_cache: bool = False) -> None:
        """Prompt and tokenize for the student and, with its OWN prompts, tokenizer and max length, for
        the guide (`.inputs` of each encoder); look up guide embeddings in `guide_cache`, filled before
        training when `prefill_guide_cache`."""
        self.collator = Collator(
            student.inputs,
            guide.inputs if guide is not None else None,
            guide_cache=guide_cache if guide is not None else None,
        )
        self.sts_collator = StsCollator(student.inputs)
        self._prefill = (
            (guide, guide_cache) if prefill_guide_cache and guide is not None and guide_cache is not None else None
        )

    def prepare_data(self) -> None:
        # Runs once per node before setup: build the cached derived files (e.g. mining), then embed
        # every local training text the guide cache lacks, so no training step runs the guide.
        for source in self.derived:
            source.materialize(self.cache_dir)
        if self._prefill is not None:
            guide, cache = self._prefill
            local = [s.source for s in self.sources() if not isinstance(s.source, HubDataset)]
            items = [
                item for row in iter_rows(local, on_bad_row=self.on_bad_row) for item in guide.inputs.row_items(row)
            ]
            # On the device the run trains on (prepare_data runs before Lightning moves the module there).
            strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
            device = strategy.root_device if strategy is not None else inference_device()
            computed = cache.fill(guide, items, device=device)
            log.info("guide cache %s: %d texts computed, %d cached", cache.dir, computed, len(cache))

    def sources(self) -> list[SourceSpec]:
        plain = [*self.train_files, *self.hub_datasets]
        derived = [s.materialize(self.cache_dir) for s in self.derived]
        specs = [*map(source_spec, plain), *self.source_specs, *map(source_spec, derived)]
        if any(s.weight is not None for s in self.source_specs):
            # A weighted mixture: train_files / hub_datasets / derived sources get weight 1 unless listed
            # under `sources` with a weight of their own.
            specs = [s if s.weight is not None else SourceSpec(s.source, 1.0, s.max_rows, s.rows) for s in specs]
        return specs

    def setup(self, stage: str | None = None) -> None:
        if self.collator is None:
            raise RuntimeError("call configure_encoders(student, guide) before fitting")
        sources = self.sources()
        if self.validate_files:
            local = [s.source for s in sources if not isinstance(s.source, HubDataset)]
            if self._validated is not None:  # the files named in the config were read by check_sources
                rest = [s for s in local if s not in self._validated_paths]
                counts = Counter(self._validated)
                counts.update(self._validate(rest) if rest else {})
                self.task_counts = dict(counts)
            else:
                self.task_counts = self._validate(local)
            small = sorted(t for t, n in self.task_counts.items() if n < self.batch_size)
            if small:
                log.warning("tasks with fewer rows than batch_size %d yield no batch: %s", self.batch_size, small)
            log.info("training rows: %d in %d tasks", sum(self.task_counts.values()), len(self.task_counts))
        self.train_set = SameTaskBatches(
            sources,
            self.batch_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            on_bad_row=self.on_bad_row,
            temperature=self.temperature,
            leftovers=self.leftovers,
            max_buffered_rows=self.max_buffered_rows,
        )
        if self._stream_state is not None:
            self.train_set.load_state_dict(self._stream_state)
        if self.val_sts_dir is not None:
            self.val_rows = list(zip(*read_sts(self.val_sts_dir, self.val_split)))

    # -- exact resume -----------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Called in the main process just before a batch is trained on (after prefetching), so the
        # recorded position is that of the last batch the model has seen, whatever workers have read ahead.
        position = batch.position if isinstance(batch, TrainBatch) else None
        if position is not None and self.trainer is not None and self.trainer.training:
            self.train_set.mark_consumed(*position)
        return batch

    def state_dict(self) -> dict:
        train_set = getattr(self, "train_set", None)
        if train_set is None:
            return {}
        state = train_set.state_dict()
        progress = self.trainer.fit_loop.epoch_loop.batch_progress if self.trainer is not None else None
        if progress is not None and progress.is_last_batch and state["next_batch"] > 0:
            # Saved after the epoch's last batch: the resumed run starts the next epoch.
            state.update(epoch=state["epoch"] + 1, next_batch=0)
        return {"stream": state}

    def load_state_dict(self, state_dict: dict) -> None:
        if "stream" not in state_dict:
            return
        self._stream_state = state_dict["stream"]
        if getattr(self, "train_set", None) is not None:
            self.train_set.load_state_dict(self._stream_state)
        log.info(
            "training stream resumes at epoch %d, global batch %d",
            self._stream_state["epoch"],
            self._stream_state["next_batch"],
        )

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:  # the rank's slice of each global batch, fixed here in the main process
            self.train_set.rank, self.train_set.world_size = self.trainer.global_rank, self.trainer.world_size
        # batch_size=None: the dataset yields whole same-task batches; the collator tokenizes them.
        return DataLoader(
            self.train_set,
            batch_size=None,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def val_dataloader(self):
        if self.val_sts_dir is None:
            return []
        return DataLoader(self.val_rows, batch_size=self.val_batch_size, shuffle=False, collate_fn=self.sts_collator)

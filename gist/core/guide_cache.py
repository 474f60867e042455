"""Guide-embedding cache: the frozen guide's embedding of a text never changes, so compute it once.

Content-addressed (63-bit text hash, `gist.data.records.text_id`) and memory-mapped: a cache folder per guide
identity (model, revision, pooling, max length, storage dtype; any change is a different folder) holds
segments `<name>.keys.npy` (sorted uint64 hashes, loaded) + `<name>.emb.npy` (float16 rows, memory-
mapped). Writers only ever add new segments under unique names (atomic renames), so DataLoader workers,
DDP ranks, runs and sweeps can share one cache; readers pick up new segments on `refresh()`.

Storage tolerance: float16 keeps ~3 significant digits; guide cosines move by < 2e-3, so a candidate
whose guide similarity is within 2e-3 of the threshold may flip its mask (tests/test_guide_cache.py).

    python scripts/cache_guide.py data.train_files=[...]     # precompute over a dataset (see the script)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


class GuideCache:
    """Args:
    root: parent folder of all guide caches (e.g. `.cache/guide`).
    guide: identity of the guide: dict with name, revision, pooling, max_length (resolved values).
    dim: embedding width (checked against the stored one).
    dtype: storage dtype, "float16" (default) or "float32".
    flush_every: buffered rows that trigger writing a segment.
    """

    def __init__(
        self, root: str | Path, guide: dict, dim: int, dtype: str = "float16", flush_every: int = 4096
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"guide cache dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        identity = {k: guide.get(k) for k in ("name", "revision", "pooling", "max_length")}
        # Settings added later enter the identity only when set, so guides without prompts keep their folders.
        for key in ("prompts", "default_prompt_name", "instructions"):
            value = guide.get(key)
            value = {k: v for k, v in value.items() if v} if isinstance(value, dict) else value
            if value:
                identity[key] = value
        if guide.get("include_prompt") is False:
            identity["include_prompt"] = False
        identity.update(dtype=dtype, dim=dim, version=1)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(identity["name"]).strip("/"))[-60:]
        self.dir = Path(root) / f"{slug}-{digest}"
        self.identity, self.dim, self.dtype, self.flush_every = identity, dim, dtype, flush_every
        self._segments: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._pending_ids: list[np.ndarray] = []
        self._pending_emb: list[np.ndarray] = []
        self._loaded = False

    @classmethod
    def for_encoder(cls, root: str | Path, encoder, **kwargs) -> GuideCache:
        """The cache of an `Encoder` (or FrozenGuide), keyed by its resolved settings (model, revision,
        pooling, max length, and its prompts when it has any)."""
        encoder = getattr(encoder, "encoder", encoder)
        guide = {k: v for k, v in encoder.settings().items() if k != "lora"}
        return cls(root, guide, encoder.dim, **kwargs)

    def __getstate__(self) -> dict:
        # Pickled into DataLoader workers / spawned ranks: they reopen the files themselves.
        state = self.__dict__.copy()
        state.update(_segments=[], _pending_ids=[], _pending_emb=[], _loaded=False)
        return state

    # ---- reading --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """(Re)load the segment list: keys into memory, embeddings memory-mapped."""
        known = {name for name, _, _ in self._segments}
        if self.dir.is_dir():
            for keys_file in sorted(self.dir.glob("*.keys.npy")):
                name = keys_file.name.removesuffix(".keys.npy")
                if name in known:
                    continue
                keys = np.load(keys_file)
                emb = np.load(self.dir / f"{name}.emb.npy", mmap_mode="r")
                if emb.shape != (len(keys), self.dim):
                    raise RuntimeError(f"{self.dir / name}: segment shape {emb.shape} != ({len(keys)}, {self.dim})")
                self._segments.append((name, keys, emb))
        self._loaded = True

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
        """found mask (n,) and, per segment, (segment index, positions in ids, rows in segment)."""
        if not self._loaded:
            self.refresh()
        found = np.zeros(len(ids), dtype=bool)
        hits = []
        for s, (_, keys, _) in enumerate(self._segments):
            todo = np.flatnonzero(~found)
            if len(todo) == 0 or len(keys) == 0:
                continue
            pos = np.minimum(np.searchsorted(keys, ids[todo]), len(keys) - 1)
            match = keys[pos] == ids[todo]
            if match.any():
                found[todo[match]] = True
                hits.append((s, todo[match], pos[match]))
        return found, hits

    def lookup(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor | None:
        """(n, dim) float32 embeddings of these text ids if ALL are cached, else None."""
        ids = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.uint64)
        found, hits = self._find(ids)
        if not found.all():
            return None
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for s, where, rows in hits:
            order = np.argsort(rows)  # sorted reads are kinder to the page cache
            out[where[order]] = self._segments[s][2][rows[order]]
        return torch.from_numpy(out)

    def missing(self, ids: Sequence[int]) -> np.ndarray:
        """Positions of the ids that are not cached."""
        found, _ = self._find(np.asarray(ids, dtype=np.uint64))
        return np.flatnonzero(~found)

    def __len__(self) -> int:
        if not self._loaded:
            self.refresh()
        return sum(len(keys) for _, keys, _ in self._segments)

    # ---- writing --------------------------------------------------------------------------------

    def add(self, ids: Sequence[int] | torch.Tensor, embeddings: torch.Tensor) -> None:
        """Buffer embeddings (n, dim) of text ids; a segment is written every `flush_every` rows."""
        ids = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.uint64)
        if embeddings.shape != (len(ids), self.dim):
            raise ValueError(f"embeddings shape {tuple(embeddings.shape)} != ({len(ids)}, {self.dim})")
        self._pending_ids.append(ids)
        self._pending_emb.append(embeddings.detach().float().cpu().numpy().astype(STORAGE_DTYPES[self.dtype]))
        if sum(len(i) for i in self._pending_ids) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as one new segment (deduplicated, sorted), atomically."""
        if not self._pending_ids:
            return
        ids = np.concatenate(self._pending_ids)
        emb = np.concatenate(self._pending_emb)
        self._pending_ids, self._pending_emb = [], []
        ids, first = np.unique(ids, return_index=True)  # sorted, one row per text
        keep = self.missing(ids)
        if len(keep) == 0:
            return
        ids, emb = ids[keep], emb[first[keep]]
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "identity.json"
        if not meta.exists():
            meta.write_text(json.dumps(self.identity, indent=1, sort_keys=True))
        name = f"seg-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        for suffix, array in (
            (".emb.npy", emb),
            (".keys.npy", ids),
        ):  # keys last: a segment is complete once they exist
            tmp = self.dir / f".{name}{suffix}.tmp"
            with tmp.open("wb") as f:
                np.save(f, array)
            tmp.replace(self.dir / f"{name}{suffix}")
        self.refresh()

    @torch.inference_mode()
    def fill(self, encoder, items: Sequence[tuple[str, str]] | Sequence[str], batch_size: int = 64, device=None) -> int:
        """Embed (with `encoder`, on `device`; None = where it is) the (prompt, text) items not yet cached (a
        plain string: no prompt); returns how many were computed. Keys are `encoder.inputs.key(prompt, text)`,
        as the collator's."""
        from gist.data.records import text_id

        encoder = getattr(encoder, "encoder", encoder)
        inputs = encoder.inputs
        unique = list(dict.fromkeys(("", i) if isinstance(i, str) else tuple(i) for i in items))
        ids = np.asarray([text_id(inputs.key(p, t)) for p, t in unique], dtype=np.uint64)
        todo = self.missing(ids)
        chunk = max(batch_size, self.flush_every)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            by_prompt: dict[str, list[int]] = {}
            for i in part:
                by_prompt.setdefault(unique[i][0], []).append(int(i))
            for prompt, idx in by_prompt.items():
                texts = [unique[i][1] for i in idx]
                emb = encoder.encode(texts, batch_size=batch_size, device=device, prompt=prompt, progress="guide cache")
                self.add(ids[idx], emb)
            self.flush()
        return len(todo)


def fill_from_datamodule(
    datamodule, guide, root: str | Path, dtype: str = "float16", chunk: int = 16384, log=None
) -> tuple[GuideCache, int]:
    """Fill the guide cache (under `root`, for `guide` and `dtype`) with every text of the datamodule's
    training sources (local files, hub streams, derived files), with the guide's own prompts: the cache
    training looks up with the same guide settings. Returns (the cache, how many texts this call
    embedded). Sources are checked first (a bad row fails before any embedding); texts are embedded
    `chunk` at a time as the rows stream by and each chunk is written, so an interrupted fill resumes
    where it stopped; texts already cached are skipped. scripts/cache_guide.py runs this from a training
    config."""
    from gist.core.encoder import inference_device
    from gist.data.records import iter_rows

    datamodule.check_sources()
    cache = GuideCache.for_encoder(root, guide, dtype=dtype)
    inputs = getattr(guide, "encoder", guide).inputs
    pending: list[tuple[str, str]] = []
    computed = 0
    for row in iter_rows([s.source for s in datamodule.sources()]):
        pending.extend(inputs.row_items(row))
        if len(pending) >= chunk:
            computed += cache.fill(guide, pending, device=inference_device())
            pending = []
            if log is not None:
                log(f"guide cache {cache.dir}: {computed} computed so far, {len(cache)} cached")
    computed += cache.fill(guide, pending, device=inference_device())
    return cache, computed

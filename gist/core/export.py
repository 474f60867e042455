"""Write a trained student as a sentence-transformers folder: Transformer -> Pooling -> Normalize.

from sentence_transformers import SentenceTransformer
model = SentenceTransformer("<run_dir>/model")   # same embeddings as the in-training encoder
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gist.core.encoder import Encoder


def export_sentence_transformer(encoder: Encoder, path: str | Path) -> Path:
    """Save `encoder` (weights, tokenizer, pooling, max length, normalisation) to `path`, atomically."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    path = Path(path)
    work = path.with_name(path.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    hf_dir = work / "hf"
    encoder.model.save_pretrained(hf_dir)
    encoder.tokenizer.save_pretrained(hf_dir)
    modules = [
        Transformer(str(hf_dir), max_seq_length=encoder.max_length),
        Pooling(encoder.dim, pooling_mode=encoder.pooling),
        Normalize(),
    ]
    SentenceTransformer(modules=modules, device="cpu").save(str(work / "st"))
    shutil.rmtree(path, ignore_errors=True)
    (work / "st").rename(path)
    shutil.rmtree(work, ignore_errors=True)
    return path

"""Collation: the rows of one batch -> the typed tensors a training / validation step reads.

`Collator` turns a same-task `RowBatch` (gist.data.batching) into a `TrainBatch` (student inputs, text
ids, and the guide's inputs or cached embeddings); `StsCollator` turns (sentence1, sentence2, score)
rows into an `StsBatch`. Both are the DataLoaders' `collate_fn` (gist.data.datamodule.GISTDataModule):

    collator = Collator(student.inputs, guide.inputs)  # gist.core.inputs.TextInputs of each encoder
    batch = collator(rows)  # TrainBatch
    loss = module.training_step(batch, 0)  # reads batch.student, batch.text_ids, batch.guide / guide_emb

The batches are (non-frozen) dataclasses: Lightning's `move_data_to_device` (apply_to_collection) moves
every tensor in their fields to the device and leaves the other fields as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gist.core.inputs import TextInputs
from gist.data.batching import RowBatch
from gist.data.records import BLOCKS, TEXT_FIELDS, text_id

# Anchors are queries; positives and negatives are documents (gist.core.inputs roles).
ROLE = {"anchor": "query", "positive": "document", "negative": "document"}
# block ("anchor" / "positive" / "negative") -> tensor; B = rows of the batch.
Blocks = dict[str, torch.Tensor]
# block -> the tokenizer's output (input_ids, attention_mask[, token_type_ids]), each (B, L_block) int64,
# padded to the block's longest text (<= the encoder's max_length).
Tokenized = dict[str, dict[str, torch.Tensor]]


@dataclass
class TrainBatch:
    """One same-task training batch of B rows, as `Collator` builds it and `GISTModule.training_step`
    reads it. Every dict is keyed by block: "anchor" (query), "positive" (pos) and, for tasks with hard
    negatives, "negative" (neg); all of them have the same keys.

    task: the task_name shared by every row.
    size: B, the rows of this (per-rank) batch.
    position: (epoch, index) of the global batch in the training stream (`RowBatch`), for exact resume
        and per-step seeding; None for rows that did not come from the stream.
    texts: block -> the B strings the student reads (its prompt, if any, prepended).
    text_ids: block -> (B,) int64 `text_id` of each of those strings (duplicate-text masks).
    student: block -> the student's tokenized inputs, each (B, L_block) int64 (and `prompt_length`, (B,),
        when the student's pooling leaves prompts out).
    guide: block -> the guide's inputs from its OWN tokenizer and max length, each (B, L'_block) int64;
        None without a guide, or when `guide_emb` holds the cached embeddings.
    guide_emb: block -> (B, D_guide) float32 guide embeddings from the `GuideCache` (float16 on disk by default);
        None when not every text of the batch is cached (or no guide / no cache).
    guide_text_ids: block -> (B,) int64 keys of the guide's inputs in its cache (the guide's own prompts);
        None without a guide.
    """

    task: str
    size: int
    position: tuple[int, int] | None
    texts: dict[str, list[str]]
    text_ids: Blocks
    student: Tokenized
    guide: Tokenized | None = None
    guide_emb: Blocks | None = None
    guide_text_ids: Blocks | None = None


@dataclass
class StsBatch:
    """One validation batch of B (sentence1, sentence2, score) rows: the student's tokenized inputs of
    each side, each (B, L) int64, and the gold scores, (B,) float32."""

    sentence1: dict[str, torch.Tensor]
    sentence2: dict[str, torch.Tensor]
    score: torch.Tensor


class Collator:
    """Rows of one batch -> a `TrainBatch`: the student's prompted and tokenized inputs, text ids, and for
    the guide either its cached embeddings (when a `GuideCache` holds every text of the batch) or inputs
    prompted and tokenized with the guide's OWN settings. Anchors take the "query" role, positives and
    negatives "document" (gist.core.inputs). Holds `TextInputs` (tokenizers, prompts) and the cache's
    path only, so DataLoader workers can pickle it.
    """

    def __init__(self, student: TextInputs, guide: TextInputs | None = None, guide_cache=None):
        self.student, self.guide, self.guide_cache = student, guide, guide_cache

    def _cached_guide(self, text_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if self.guide_cache is None:
            return None
        for attempt in range(2):
            out = {k: self.guide_cache.lookup(v) for k, v in text_ids.items()}
            if all(v is not None for v in out.values()):
                return out
            if attempt == 0:
                self.guide_cache.refresh()  # another process (the trainer, a rank) may have added segments
        return None

    def __call__(self, rows: list[dict]) -> TrainBatch:
        fields = [f for f in TEXT_FIELDS if rows[0][f] is not None]
        raw = {BLOCKS[f]: [r[f] for r in rows] for f in fields}
        instructs = {BLOCKS[f]: [(r.get("instruct") or {}).get(f) for r in rows] for f in fields}

        def prompted(inputs: TextInputs) -> dict[str, list[str]]:
            return {b: inputs.prompts_of(raw[b], ROLE[b], instructs[b]) for b in raw}

        prompts = prompted(self.student)
        texts = {b: [p + t for p, t in zip(prompts[b], raw[b])] for b in raw}
        batch = TrainBatch(
            task=rows[0]["task_name"],
            size=len(rows),
            # (epoch, index) of the global batch in the stream (RowBatch), for exact resume.
            position=(rows.epoch, rows.index) if isinstance(rows, RowBatch) else None,
            texts=texts,
            text_ids={b: torch.tensor([text_id(t) for t in v]) for b, v in texts.items()},
            student={b: self.student.tokenize(texts[b], prompts[b]) for b in raw},
        )
        if self.guide is not None:
            guide_prompts = prompts if self.guide.prompts_equal(self.student) else prompted(self.guide)
            keys = {b: [self.guide.key(p, t) for p, t in zip(guide_prompts[b], raw[b])] for b in raw}
            batch.guide_text_ids = {b: torch.tensor([text_id(k) for k in v]) for b, v in keys.items()}
            batch.guide_emb = self._cached_guide(batch.guide_text_ids)
            if batch.guide_emb is None:
                batch.guide = {
                    b: self.guide.tokenize([p + t for p, t in zip(guide_prompts[b], raw[b])], guide_prompts[b])
                    for b in raw
                }
        return batch


class StsCollator:
    """(sentence1, sentence2, score) rows -> an `StsBatch`: student inputs for both sides (the "query"
    role's prompt: STS is symmetric) and the gold scores."""

    def __init__(self, inputs: TextInputs):
        self.inputs = inputs

    def __call__(self, rows: list[tuple[str, str, float]]) -> StsBatch:
        s1, s2, score = zip(*rows)
        return StsBatch(
            sentence1=self.inputs(list(s1), "query")[1],
            sentence2=self.inputs(list(s2), "query")[1],
            score=torch.tensor(score, dtype=torch.float32),
        )

"""Text encoders: a Hugging Face `AutoModel` + pooling + L2 normalisation, and the frozen guide.

The pooling mode is read from the model's sentence-transformers config (`modules.json` ->
`*_Pooling/config.json`), unless given: UAE-Large-V1 must be forced to `mean` (its CLS config appeared
after GIST was trained). Hub ids load through the ordinary Hugging Face cache; offline, a model that is
not cached fails at once with a message that says what to do.

    enc = Encoder("sentence-transformers/all-MiniLM-L6-v2")
    emb = enc.encode(["hello world"])          # (1, 384), unit norm
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BatchEncoding

log = logging.getLogger(__name__)

POOLING_MODES = ("cls", "mean")
OFFLINE_MODELS = ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-mpnet-base-v2")


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded (not cached offline, unknown id, no network)."""


class RemoteCodeError(ModelUnavailableError):
    """The model needs its own code (`auto_map`) and the config did not set trust_remote_code."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _unavailable(name: str, revision: str | None, err: Exception) -> ModelUnavailableError:
    where = "the hub is disabled (HF_HUB_OFFLINE=1)" if _offline() else "the hub could not be reached or refused it"
    return ModelUnavailableError(
        f"Cannot load model {name!r} (revision {revision or 'main'}): it is not a local folder, not in the "
        f"Hugging Face cache, and {where}.\n"
        f"  - With hub access: unset HF_HUB_OFFLINE, or pre-download it: "
        f"`hf download {name}{' --revision ' + revision if revision else ''}`.\n"
        f"  - Without: point the config at a local folder (e.g. model.name=/path/to/model).\n"
        f"  - Available offline on machines without the hub: {', '.join(OFFLINE_MODELS)} "
        f"(`python -m gist.infra.offline_models` lays them out).\n"
        f"  Cause: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )


def _read_json(name: str, filename: str, revision: str | None) -> dict | list | None:
    """A JSON file of a local folder or hub repo (from the cache when offline); None if absent."""
    if Path(name).is_dir():
        path = Path(name) / filename
        return json.loads(path.read_text()) if path.exists() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(name, filename, revision=revision)).read_text())
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def read_st_config(name: str, revision: str | None = None) -> tuple[str | None, int | None]:
    """(pooling mode, max_seq_length) from a sentence-transformers folder/repo; None where absent."""
    modules = _read_json(name, "modules.json", revision) or []
    pooling = None
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            cfg = _read_json(name, f"{module['path']}/config.json", revision) or {}
            if "pooling_mode" in cfg:  # sentence-transformers >= 6 format
                pooling = cfg["pooling_mode"] if isinstance(cfg["pooling_mode"], str) else cfg["pooling_mode"][0]
            elif cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            else:
                pooling = next((k.removeprefix("pooling_mode_") for k, v in cfg.items() if v is True), None)
    st_cfg = _read_json(name, "sentence_bert_config.json", revision) or {}
    return pooling, st_cfg.get("max_seq_length")


def pool(last_hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """(B, T, d) token states -> (B, d) sentence embedding."""
    if mode == "cls":
        return last_hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)  # (B, T, 1)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class Encoder(nn.Module):
    """AutoModel + pooling + L2 normalisation, with its own tokenizer and max length.

    Args:
        name: hub id or local folder (transformers or sentence-transformers layout).
        revision: hub revision (commit, tag or branch); None = main.
        pooling: "cls" or "mean"; None reads the model's sentence-transformers pooling config
            (mean when the model has none).
        max_length: tokens per text; None reads sentence-transformers' max_seq_length (else 512).
        trust_remote_code: run code shipped with the model; off unless the config sets it.
        gradient_checkpointing: trade compute for activation memory in the student.
    """

    def __init__(
        self,
        name: str,
        revision: str | None = None,
        pooling: str | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if pooling is not None and pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES} or null (read from the model), got {pooling!r}")
        self.name, self.revision = name, revision
        kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
        try:
            AutoConfig.from_pretrained(name, **kwargs)  # cheap: fails fast before any weights move
            st_pooling, st_max_length = read_st_config(name, revision)
        except (OSError, ValueError) as err:
            if not trust_remote_code and "trust_remote_code" in str(err):
                raise RemoteCodeError(
                    f"Model {name!r} (revision {revision or 'main'}) ships its own Python code, which is not run "
                    "unless the config says so: if you trust it, set trust_remote_code=true in the model (or "
                    "guide) config, e.g. model.trust_remote_code=true, ideally with a pinned revision."
                ) from err
            raise _unavailable(name, revision, err) from err
        self.model = AutoModel.from_pretrained(name, **kwargs)
        # The model's own pooler (BERT-style CLS dense + tanh) is unused: embeddings pool the hidden
        # states. Frozen, it is left out of the optimizer and of DDP, which would otherwise wait for
        # gradients that never come (DDP with find_unused_parameters=False).
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        if pooling is None and st_pooling not in POOLING_MODES:
            log.warning("%s: no usable sentence-transformers pooling config (%s); using mean pooling", name, st_pooling)
        self.pooling = pooling or (st_pooling if st_pooling in POOLING_MODES else "mean")
        self.max_length = int(max_length or st_max_length or min(self.tokenizer.model_max_length, 512))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.train()  # from_pretrained returns eval mode; a fresh module trains (dropout on) like any other

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, texts: list[str]) -> BatchEncoding:
        """Dynamic padding to the longest text of the batch, truncation at max_length."""
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Tokenized batch -> (B, d) unit-norm embeddings."""
        ids = "inputs_embeds" if "inputs_embeds" in features else "input_ids"  # see encode_blocks
        inputs = {k: v for k, v in features.items() if k in (ids, "attention_mask", "token_type_ids")}
        out = self.model(**inputs)
        return F.normalize(pool(out.last_hidden_state, features["attention_mask"], self.pooling), dim=-1)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64, device: torch.device | str | None = None) -> Tensor:
        """Embed texts in length-sorted batches (less padding); returns (N, d) fp32 on CPU, input order."""
        was_training = self.training
        self.eval()
        device = device or next(self.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            features = self.tokenize([texts[i] for i in idx]).to(device)
            out[idx] = self(features).float().cpu()
        self.train(was_training)
        return out


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is ones then zeros, so trimming columns past a row's length loses nothing."""
    lengths = attention_mask.sum(1, keepdim=True)
    positions = torch.arange(1, attention_mask.size(1) + 1, device=attention_mask.device)
    return bool((attention_mask.cumsum(1) == torch.minimum(positions, lengths)).all())


def encode_blocks(
    encoder: nn.Module, blocks: dict[str, dict[str, Tensor]], bucket_size: int | None = None
) -> dict[str, Tensor]:
    """Embed several tokenized blocks (anchor / positive / negative) -> {block: (B, d)}.

    bucket_size None: one forward per block, padded to the block's longest text. Otherwise the texts of
    ALL blocks are sorted by length and embedded `bucket_size` at a time, each bucket trimmed to its own
    longest text: the same embeddings (padded keys get zero attention weight; they differ only by float
    summation order) and gradients, for fewer padded tokens. Needs right padding (BERT, MPNet); with
    left-padded inputs it falls back to one forward per block.
    """
    if not bucket_size:
        return {block: encoder(features) for block, features in blocks.items()}
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in next(iter(blocks.values()))]
    width = max(f["attention_mask"].size(1) for f in blocks.values())
    padded = {
        k: torch.cat([F.pad(f[k], (0, width - f[k].size(1))) for f in blocks.values()]) for k in keys
    }  # pad id 0: padded positions are masked out of attention and pooling, their ids never matter
    mask = padded["attention_mask"]
    lengths = mask.sum(1)
    if not is_right_padded(mask):
        return {block: encoder(features) for block, features in blocks.items()}
    word_embeddings = encoder.model.get_input_embeddings() if isinstance(encoder, Encoder) else None
    if torch.is_grad_enabled() and word_embeddings is not None and word_embeddings.weight.requires_grad:
        # Look the tokens up once for the whole step: one backward into the (dense, vocab x d)
        # embedding gradient instead of one per bucket.
        padded["inputs_embeds"] = word_embeddings(padded.pop("input_ids"))
    order = torch.argsort(lengths, descending=True, stable=True)
    embs = []
    for idx in order.split(bucket_size):
        longest = int(lengths[idx].max())
        embs.append(encoder({k: v[idx, :longest] for k, v in padded.items()}))
    out = torch.cat(embs)[torch.argsort(order)]  # back to block order; gradients flow to every bucket
    sizes = [f["attention_mask"].size(0) for f in blocks.values()]
    return dict(zip(blocks, out.split(sizes)))


class FrozenGuide(nn.Module):
    """The guide, frozen in this one place: eval mode for good (dropout off), requires_grad False,
    no-grad encoding. The training module keeps it out of its parameters, the optimizer and checkpoints.
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenGuide:
        """Ignored: a `.train()` (e.g. after a validation loop) keeps the guide in eval mode."""
        return self

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def tokenize(self, texts: list[str]) -> BatchEncoding:
        return self.encoder.tokenize(texts)

    @torch.no_grad()
    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.encoder(features)

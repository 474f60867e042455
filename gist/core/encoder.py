"""Text encoders: a sentence-transformers model of the base (its Transformer's weights train), our
pooling, the base's own modules after pooling (Dense, Normalize, ...), and the frozen guide.

The base model is loaded as sentence-transformers loads it (`SentenceTransformer(name, revision)`), so
what the base defines is kept: its pooling (every mode sentence-transformers can name: cls, mean, max,
mean_sqrt_len_tokens, weightedmean, lasttoken, or several concatenated; `include_prompt`), Dense and
Normalize layers, prompts, max_seq_length; any of them can be overridden, and an unknown pooling mode is
an error. A folder without a sentence-transformers config gets mean pooling (with a warning), as in
sentence-transformers. The export (gist.core.export) saves this same sentence-transformers model.

The transformer's forward and the pooling are ours, to keep the training-speed levers exact: bucketed
encoding (`encode_blocks`), one word-embedding lookup per step, and per-text prompt lengths (a bucket mixes
queries and documents). Pooling follows sentence-transformers' definitions (tests check equality with
its Pooling module and `SentenceTransformer.encode`), for either padding side.

LoRA (`lora={"r": 16, "alpha": 32, "target_modules": [...]}`, through peft): only the adapters train.

    enc = Encoder("sentence-transformers/all-MiniLM-L6-v2")
    emb = enc.encode(["hello world"])                   # (1, 384), unit norm
    q = enc.encode(["what is GIST?"], role="query")      # with the model's query prompt, if it has one
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig

from gist.core.inputs import TextInputs
from gist.infra.progress import progress as bar
from gist.infra.progress import quiet_library_bars

log = logging.getLogger(__name__)

# sentence-transformers' pooling modes (sentence_transformers Pooling.POOLING_MODES).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
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


def check_pooling(pooling) -> str | tuple[str, ...]:
    """A pooling mode (or several, concatenated) as sentence-transformers names them; else ValueError."""
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"unknown pooling mode {pooling!r}: use one of {POOLING_MODES} (or a list of them), or null")
    return modes[0] if len(modes) == 1 else modes


def pool(last_hidden: Tensor, attention_mask: Tensor, mode, prompt_length: Tensor | None = None) -> Tensor:
    """(B, T, d) token states -> (B, d * modes) sentence embeddings, as sentence-transformers' Pooling
    defines each mode, for right or left padding. `prompt_length` (B,): leading tokens of each text that
    are its prompt, left out of the pooling (include_prompt=False); weightedmean keeps the other tokens'
    original position weights."""
    modes = (mode,) if isinstance(mode, str) else mode
    T = last_hidden.size(1)
    positions = torch.arange(T, device=last_hidden.device)
    start = attention_mask.to(torch.int32).argmax(1)  # first real token: > 0 only under left padding
    mask = attention_mask
    if prompt_length is not None:
        mask = mask * (positions[None, :] >= (start + prompt_length.to(start.device))[:, None])
    acc = torch.float32 if last_hidden.dtype in (torch.float16, torch.bfloat16) else last_hidden.dtype
    out = []
    for m in modes:
        if m == "cls":  # the first token that is neither padding nor prompt
            first = mask.to(torch.int32).argmax(1)
            out.append(last_hidden[torch.arange(len(first)), first])
        elif m == "lasttoken":
            values, from_end = mask.flip(1).max(1)
            last = torch.where(values == 0, 0, T - 1 - from_end)
            out.append(last_hidden[torch.arange(len(last)), last] * values[:, None].to(last_hidden.dtype))
        elif m == "max":
            out.append(last_hidden.masked_fill(mask[..., None] == 0, float("-inf")).max(1).values)
        elif m in ("mean", "mean_sqrt_len_tokens"):
            w = mask[..., None].to(last_hidden.dtype)
            total = (last_hidden * w).sum(1, dtype=acc)
            count = w.sum(1, dtype=acc).clamp(min=1e-9)
            out.append((total / (count if m == "mean" else count.sqrt())).to(last_hidden.dtype))
        elif m == "weightedmean":
            weights = (positions[None, :] + 1 - start[:, None]).to(acc) * mask.to(
                acc
            )  # 1, 2, ... from the first real token
            total = (last_hidden * weights[..., None]).sum(1)
            out.append((total / weights.sum(1, keepdim=True).clamp(min=1e-9)).to(last_hidden.dtype))
        else:
            check_pooling(m)
    return out[0] if len(out) == 1 else torch.cat(out, -1)


class Encoder(nn.Module):
    """A sentence-transformers model of the base, trainable, with its own tokenizer, prompts and max length.

    Args:
        name: hub id or local folder (sentence-transformers or plain transformers layout).
        revision: hub revision (commit, tag or branch); None = main.
        pooling: a sentence-transformers pooling mode (or a list of them, concatenated); None = the
            model's own (mean when it has none).
        include_prompt: pool over prompt tokens too; None = the model's own setting (True by default).
        max_length: tokens per text; None = the model's max_seq_length (else min(model max, 512)).
        prompts: named prompts ({"query": ..., "document": ..., "<mteb task or type>": ...}); None = the
            model's own (config_sentence_transformers.json). Anchors take "query", positives and negatives
            "document" (gist.core.inputs); the export writes them, the evaluation uses them through mteb.
        default_prompt_name: the prompt for a role without one; None = the model's own when `prompts` is None.
        instructions: role -> template with "{instruct}", filled with each training row's instruction
            (the *_instruct columns); None = instructions unused (GIST's recipe).
        lora: {"r", "alpha", "dropout", "target_modules"} adapters through peft (only they train); None =
            full fine-tuning.
        trust_remote_code: run code shipped with the model; off unless the config sets it.
        gradient_checkpointing: trade compute for activation memory in the transformer.
    """

    def __init__(
        self,
        name: str,
        revision: str | None = None,
        pooling: str | list[str] | None = None,
        include_prompt: bool | None = None,
        max_length: int | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        instructions: dict[str, str] | None = None,
        lora: dict | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if pooling is not None:
            pooling = check_pooling(pooling)
        self.name, self.revision = name, revision
        self.lora = dict(lora) if lora else None
        st = load_sentence_transformer(name, revision, trust_remote_code)
        self.__dict__["st"] = st  # not a registered submodule: its modules are registered below, once each
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling

        modules = list(st)
        if not isinstance(modules[0], Transformer):
            raise ValueError(f"{name}: the first module is {type(modules[0]).__name__}, not a Transformer")
        at = next((i for i, m in enumerate(modules) if isinstance(m, Pooling)), None)
        if at != 1:
            raise ValueError(
                f"{name}: expected Transformer -> Pooling -> ..., got {[type(m).__name__ for m in modules]}"
            )
        base_pooling = modules[1]
        if pooling is not None or include_prompt is not None:
            new = Pooling(
                base_pooling.embedding_dimension,
                pooling_mode=pooling if pooling is not None else base_pooling.pooling_mode,
                include_prompt=base_pooling.include_prompt if include_prompt is None else include_prompt,
            )
            st._modules[list(st._modules)[1]] = new
            base_pooling = new
        self.pooling = check_pooling(base_pooling.pooling_mode)
        self.include_prompt = bool(base_pooling.include_prompt)
        if not any(isinstance(m, Normalize) for m in modules[2:]):
            st.append(Normalize())  # training optimises cosine similarity: the export says so too
        self.head = nn.ModuleList(list(st)[2:])  # Dense, Normalize, ... as the base defines them

        transformer = modules[0]
        self.model = transformer.model
        self.tokenizer = transformer.tokenizer
        # The model's own pooler (BERT-style CLS dense + tanh) is unused: embeddings pool the hidden
        # states. Frozen, it is left out of the optimizer and of DDP, which would otherwise wait for
        # gradients that never come (DDP with find_unused_parameters=False).
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        if self.tokenizer.pad_token_id is None:  # decoders often have none: pad with EOS (masked out)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_max = getattr(self.tokenizer, "model_max_length", 512) or 512
        self.max_length = int(max_length or transformer.max_seq_length or min(model_max, 512))
        transformer.max_seq_length = self.max_length
        if prompts is not None:
            st.prompts = dict(prompts)
            st.default_prompt_name = default_prompt_name
        elif default_prompt_name is not None:
            st.default_prompt_name = default_prompt_name
        self.prompts = {k: v for k, v in (st.prompts or {}).items()}
        self.default_prompt_name = st.default_prompt_name
        self.instructions = {k: v for k, v in (instructions or {}).items() if v}
        _ = self.inputs  # validates prompts and instructions now, not at the first batch
        if gradient_checkpointing:
            # Non-reentrant: gradients reach the weights even when no input requires grad (LoRA, frozen embeddings).
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if self.lora:
            self.model = add_lora(self.model, self.lora)
            self.head.requires_grad_(False)
        self._takes_position_ids = "position_ids" in inspect.signature(transformer.model.forward).parameters
        self.train()  # from_pretrained returns eval mode; a fresh module trains (dropout on) like any other

    def settings(self) -> dict:
        """The constructor arguments that rebuild this encoder around saved weights (checkpoints)."""
        return dict(
            name=self.name,
            revision=self.revision,
            pooling=list(self.pooling) if isinstance(self.pooling, tuple) else self.pooling,
            include_prompt=self.include_prompt,
            max_length=self.max_length,
            prompts=dict(self.prompts),
            default_prompt_name=self.default_prompt_name,
            instructions=dict(self.instructions) or None,
            lora=self.lora,
        )

    @property
    def dim(self) -> int:
        return self.st.get_embedding_dimension()

    @property
    def inputs(self) -> TextInputs:
        """Raw texts -> this encoder's inputs (prompts by role, tokenization), picklable for DataLoaders."""
        return TextInputs(
            self.tokenizer,
            self.max_length,
            prompts=self.prompts,
            default_prompt_name=self.default_prompt_name,
            instructions=self.instructions,
            include_prompt=self.include_prompt,
        )

    def tokenize(self, texts: list[str], prompt: str = "") -> dict[str, Tensor]:
        """Texts (prompt prepended here) -> padded inputs, truncated at max_length."""
        return self.inputs.tokenize([prompt + t for t in texts], [prompt] * len(texts))

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Tokenized batch -> (B, d) unit-norm embeddings."""
        ids = "inputs_embeds" if "inputs_embeds" in features else "input_ids"  # see encode_blocks
        inputs = {k: v for k, v in features.items() if k in (ids, "attention_mask", "token_type_ids")}
        mask = features["attention_mask"]
        if self._takes_position_ids and not is_right_padded(mask):
            # Left padding: each text's positions count from its first token, whatever the padding (the
            # same positions as right padding; rotary models are shift-invariant anyway, absolute ones
            # are not), so a text embeds alike in any bucket.
            inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.model(**inputs).last_hidden_state
        prompt_length = None if self.include_prompt else features.get("prompt_length")
        out = {"sentence_embedding": pool(hidden, features["attention_mask"], self.pooling, prompt_length)}
        for module in self.head:
            out = module(out)
        return out["sentence_embedding"]

    @torch.inference_mode()
    def encode(
        self,
        texts: list[str],
        batch_size: int = 64,
        device: torch.device | str | None = None,
        role: str | None = None,
        prompt: str | None = None,
        progress: str | None = None,
    ) -> Tensor:
        """Embed texts in length-sorted batches (less padding); returns (N, d) fp32 on CPU, input order.
        The prompt: `prompt` if given, else the prompt of `role` ("query" / "document"), else none.
        `progress`: the label of a progress bar (shown on a terminal only)."""
        if prompt is None:
            prompt = self.inputs.prompt(role) if role is not None else ""
        was_training = self.training
        self.eval()
        device = device or next(self.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out = torch.empty(len(texts), self.dim)
        with bar(len(texts), progress or "encoding") as shown:
            shown.disable = shown.disable or progress is None
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                features = {k: v.to(device) for k, v in self.tokenize([texts[i] for i in idx], prompt).items()}
                out[idx] = self(features).float().cpu()
                shown.update(len(idx))
        self.train(was_training)
        return out

    def check_loaded(self, result, prefix: str = "") -> None:
        """After `load_state_dict(..., strict=False)` of a module holding this encoder under `prefix`:
        with LoRA, checkpoints hold the adapters only, so every missing key must be a frozen base weight;
        any other missing or unexpected key is an error, as with strict loading."""
        trainable = {prefix + n for n, p in self.named_parameters() if p.requires_grad} if self.lora else None
        missing = [k for k in result.missing_keys if trainable is None or k in trainable or not k.startswith(prefix)]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint does not match the {'LoRA ' if self.lora else ''}model: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )

    @contextlib.contextmanager
    def sentence_transformer(self):
        """The sentence-transformers model of the base with this encoder's weights (LoRA merged into a
        copy), prompts, pooling and max length: what the export saves."""
        if not self.lora:
            yield self.st
            return
        transformer = self.st[0]
        original = transformer.model
        transformer.model = copy.deepcopy(self.model).merge_and_unload()
        try:
            yield self.st
        finally:
            transformer.model = original


def hub_commit(name: str, revision: str | None = None) -> str | None:
    """The commit a hub id (at `revision`) resolves to in the local Hugging Face cache, if cached."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(path, str) and "snapshots" in Path(path).parts:
        parts = Path(path).parts
        return parts[parts.index("snapshots") + 1]
    return None


def load_sentence_transformer(name: str, revision: str | None, trust_remote_code: bool):
    """`SentenceTransformer(name, revision)` on CPU, failing fast (before any weights move) with a message
    that says what to do when the model is not available or needs remote code."""
    from sentence_transformers import SentenceTransformer

    quiet_library_bars()
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        AutoConfig.from_pretrained(name, **kwargs)  # cheap: fails fast before any weights move
    except (OSError, ValueError) as err:
        if not trust_remote_code and "trust_remote_code" in str(err):
            raise RemoteCodeError(
                f"Model {name!r} (revision {revision or 'main'}) ships its own Python code, which is not run "
                "unless the config says so: if you trust it, set trust_remote_code=true in the model (or "
                "guide) config, e.g. model.trust_remote_code=true, ideally with a pinned revision."
            ) from err
        raise _unavailable(name, revision, err) from err
    return SentenceTransformer(name, device="cpu", local_files_only=_offline(), **kwargs)


def add_lora(model: nn.Module, lora: dict) -> nn.Module:
    """`model` with peft LoRA adapters (only they require grad). `lora`: r, alpha (default 2r), dropout
    (default 0), target_modules (None = every linear layer of the transformer)."""
    from peft import LoraConfig, get_peft_model

    unknown = set(lora) - {"r", "alpha", "dropout", "target_modules"}
    if unknown:
        raise ValueError(f"model.lora: unknown keys {sorted(unknown)} (use r, alpha, dropout, target_modules)")
    r = int(lora.get("r") or 0)
    if r < 1:
        raise ValueError(f"model.lora.r must be >= 1, got {lora.get('r')!r} (model.lora=null: full fine-tuning)")
    targets = lora.get("target_modules")
    config = LoraConfig(
        r=r,
        lora_alpha=lora.get("alpha") or 2 * r,
        lora_dropout=lora.get("dropout") or 0.0,
        target_modules=list(targets) if targets else "all-linear",
    )
    return get_peft_model(model, config)


def padding_side(attention_mask: Tensor) -> str | None:
    """ "right" when every row is ones then zeros, "left" when zeros then ones (a batch without padding
    is "right"), None otherwise."""
    if is_right_padded(attention_mask):
        return "right"
    return "left" if is_right_padded(attention_mask.flip(1)) else None


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is ones then zeros, so trimming columns past a row's length loses nothing."""
    lengths = attention_mask.sum(1, keepdim=True)
    positions = torch.arange(1, attention_mask.size(1) + 1, device=attention_mask.device)
    return bool((attention_mask.cumsum(1) == torch.minimum(positions, lengths)).all())


def trim(features: dict[str, Tensor], side: str | None) -> dict[str, Tensor]:
    """Drop the columns that are padding in every row (on `side`; None = keep all)."""
    if side is None:
        return features
    longest = int(features["attention_mask"].sum(1).max())
    cut = slice(None, longest) if side == "right" else slice(features["attention_mask"].size(1) - longest, None)
    return {k: v[:, cut] if v.dim() >= 2 else v for k, v in features.items()}


def _pad_to(x: Tensor, width: int, side: str, value: int) -> Tensor:
    if x.dim() < 2 or x.size(1) == width:
        return x
    extra = width - x.size(1)
    pad = (0, extra) if side == "right" else (extra, 0)
    return nn.functional.pad(x, (0, 0, *pad) if x.dim() == 3 else pad, value=value)


def encode_blocks(
    encoder: nn.Module, blocks: dict[str, dict[str, Tensor]], bucket_size: int | None = None
) -> dict[str, Tensor]:
    """Embed several tokenized blocks (anchor / positive / negative) -> {block: (B, d)}.

    bucket_size None: one forward per block, padded to the block's longest text. Otherwise the texts of
    ALL blocks are sorted by length and embedded `bucket_size` at a time, each bucket trimmed to its own
    longest text on the tokenizer's padding side (right for BERT and MPNet, left for most decoders; the
    pad id is the tokenizer's): the same embeddings (padded keys get zero attention weight; they differ
    only by float summation order, and under left padding by the rotary positions' common shift) and
    gradients, for fewer padded tokens. Blocks padded on different sides fall back to one forward each.
    """
    if not bucket_size:
        return {block: encoder(features) for block, features in blocks.items()}
    sides = {padding_side(f["attention_mask"]) for f in blocks.values()}
    if len(sides) != 1 or None in sides:
        return {block: encoder(features) for block, features in blocks.items()}
    side = sides.pop()
    first = next(iter(blocks.values()))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "prompt_length") if k in first]
    tokenizer = getattr(encoder, "tokenizer", None)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    width = max(f["attention_mask"].size(1) for f in blocks.values())
    padded = {
        k: torch.cat([_pad_to(f[k], width, side, pad_id if k == "input_ids" else 0) for f in blocks.values()])
        for k in keys
    }
    lengths = padded["attention_mask"].sum(1)
    model = getattr(encoder, "model", None)
    word_embeddings = model.get_input_embeddings() if isinstance(encoder, Encoder) else None
    if torch.is_grad_enabled() and word_embeddings is not None and word_embeddings.weight.requires_grad:
        # Look the tokens up once for the whole step: one backward into the (dense, vocab x d)
        # embedding gradient instead of one per bucket.
        padded["inputs_embeds"] = word_embeddings(padded.pop("input_ids"))
    order = torch.argsort(lengths, descending=True, stable=True)
    embs = [encoder(trim({k: v[idx] for k, v in padded.items()}, side)) for idx in order.split(bucket_size)]
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

    @property
    def inputs(self) -> TextInputs:
        return self.encoder.inputs

    def tokenize(self, texts: list[str], prompt: str = "") -> dict[str, Tensor]:
        return self.encoder.tokenize(texts, prompt)

    @torch.no_grad()
    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.encoder(features)

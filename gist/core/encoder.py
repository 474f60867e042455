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

from gist.core.bucketing import is_right_padded
from gist.core.inputs import TextInputs
from gist.core.packing import ROW_TOKENS, enable_packing
from gist.core.pooling import POOLING_MODES, check_pooling, pool  # noqa: F401 (POOLING_MODES: re-exported)
from gist.infra.progress import progress as bar
from gist.infra.progress import quiet_library_bars

log = logging.getLogger(__name__)

OFFLINE_MODELS = ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-mpnet-base-v2")


def inference_device() -> torch.device:
    """Where embedding outside a training step runs (mining, evaluation; the guide-cache prefill uses the
    trainer's device): the first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        attn_implementation: transformers' attention kernel ("sdpa", "eager", "flash_attention_2"); None = its
            default. A runtime choice, like the two below (not in settings()).
        packing: embed a training step's texts padding-free, in packed rows with attention kept within
            each text (gist.core.packing; encode_blocks's buckets then group the attention only). Padded
            batches (evaluation, mining) run as before. Needs a model whose attention uses transformers'
            AttentionInterface.
        packed_row_tokens: tokens per packed row (one forward each); None = the whole step in one row.
        compile: torch.compile the transformer in place (dynamic shapes).
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
        attn_implementation: str | None = None,
        packing: bool = False,
        packed_row_tokens: int | None = ROW_TOKENS,
        compile: bool = False,
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
        # Raw texts -> this encoder's inputs (prompts by role, tokenization), picklable for DataLoaders; built
        # once (it validates the prompts and instructions now, and caches prompt lengths).
        self.inputs = TextInputs(
            self.tokenizer,
            self.max_length,
            prompts=self.prompts,
            default_prompt_name=self.default_prompt_name,
            instructions=self.instructions,
            include_prompt=self.include_prompt,
        )
        if attn_implementation is not None:
            # "sdpa" (transformers' default where the model supports it), "eager", "flash_attention_2" (CUDA,
            # the flash-attn package), ...: a runtime choice, the same weights (not part of settings()).
            self.model.set_attn_implementation(attn_implementation)
        self._takes_position_ids = "position_ids" in inspect.signature(transformer.model.forward).parameters
        self.packing = bool(packing)
        if packed_row_tokens is not None and packed_row_tokens < 1:
            raise ValueError(f"packed_row_tokens must be >= 1 or null, got {packed_row_tokens}")
        self.packed_row_tokens = packed_row_tokens
        if self.packing:
            if not self._takes_position_ids:
                raise ValueError(f"{name}: its model takes no position_ids, so it cannot pack; set model.packing=false")
            enable_packing(self.model)
        if gradient_checkpointing:
            # Non-reentrant: gradients reach the weights even when no input requires grad (LoRA, frozen embeddings).
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if self.lora:
            self.model = add_lora(self.model, self.lora)
            self.head.requires_grad_(False)
        if compile:
            # torch.compile of the transformer, in place (same parameter names, checkpoints and export): one
            # compilation per new shape class with dynamic shapes; pays off over long runs (docs/PERFORMANCE.md).
            self.model.compile(dynamic=True)
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

    def tokenize(self, texts: list[str], prompt: str = "") -> dict[str, Tensor]:
        """Texts (prompt prepended here) -> padded inputs, truncated at max_length."""
        return self.inputs.tokenize([prompt + t for t in texts], [prompt] * len(texts))

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Tokenized batch (padded, or packed by gist.core.packing.pack_blocks) -> (B, d) unit-norm embeddings."""
        ids = "inputs_embeds" if "inputs_embeds" in features else "input_ids"  # see encode_blocks
        layout = features.get("packing")
        if layout is not None:
            if not self.packing:
                raise ValueError(f"{self.name}: packed inputs need an encoder built with packing=True")
            inputs = {k: v for k, v in features.items() if k in (ids, "token_type_ids")}
            packed = self.model(**inputs, position_ids=layout.position_ids, gist_packing=layout).last_hidden_state
            hidden, mask = (
                layout.view.pad(packed[0]),
                layout.view.valid.long(),
            )  # per text, right-padded for the pooling
        else:
            inputs = {k: v for k, v in features.items() if k in (ids, "attention_mask", "token_type_ids")}
            mask = features["attention_mask"]
            # The padding side when the caller knows it (encode_blocks), else read from the mask.
            side = features.get("padding_side") or ("right" if is_right_padded(mask) else "left")
            if self._takes_position_ids and side != "right":
                # Left padding: each text's positions count from its first token, whatever the padding (the
                # same positions as right padding; rotary models are shift-invariant anyway, absolute ones
                # are not), so a text embeds alike in any bucket.
                inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
            hidden = self.model(**inputs).last_hidden_state
        prompt_length = None if self.include_prompt else features.get("prompt_length")
        out = {"sentence_embedding": pool(hidden, mask, self.pooling, prompt_length)}
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
        `device`: where to run (the encoder moves there and stays); None = where its weights are.
        `progress`: the label of a progress bar (shown on a terminal only)."""
        if prompt is None:
            prompt = self.inputs.prompt(role) if role is not None else ""
        was_training = self.training
        self.eval()
        device = torch.device(device) if device is not None else next(self.parameters()).device
        self.to(device)
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
    def packing(self) -> bool:
        return self.encoder.packing

    @property
    def packed_row_tokens(self) -> int | None:
        return self.encoder.packed_row_tokens

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

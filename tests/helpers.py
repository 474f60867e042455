"""Plain helpers shared by the tests (tests/conftest.py holds the fixtures, built from these).

    from tests.helpers import load, tiny_cfg, write_jsonl

- data: WORDS, sentence, write_jsonl; models: make_tiny_bert (a random BERT + WordPiece folder)
- config: CONF, load (conf/train.yaml composed with overrides), tiny_cfg (a `train(cfg)` config on the
  tiny fixtures, paths in tmp); assert_metric / assert_run_files (what `train(cfg)` returned and wrote)
- running scripts/train.py: tiny (CLI overrides on the tiny fixtures), with_overrides, run_in_process
  (Hydra's real entry point in this process), run_subprocess, job_dirs, RecordReturns (a Hydra callback
  recording what a sweeper receives), recipes / recipe (README's Recipes section)
- outputs: read_wandb_file (records of an offline W&B run), wandb_runs; fake_job / make_fake_sweep (an
  ablation sweep's run folders with hand-picked scores)
- faults: KillAtStep (a Lightning callback that SIGKILLs the run's process group at a step; configs
  name it `tests.helpers.KillAtStep`)

Cheap to import: torch, transformers, Lightning and Hydra are imported where they are used.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA = ROOT / "data" / "mteb"

WORDS = (
    "the a an is are was were be to of and in on for with my your card bank money account transfer "
    "happy sad angry fear love surprise joy movie film great bad good terrible product review book "
    "cat dog man woman plays guitar piano flute runs walks eats food pizza cheese plane flying taking off "
    "i you he she it we they not very really so what how when where why can do does did please help"
).split()


def set_test_environment() -> None:
    """Tests never touch the network; W&B writes offline runs; configs resolve paths from this checkout."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["GIST_ROOT"] = str(ROOT)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- data and models ------------------------------------------------------------------------------------


def sentence(rng, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_bert(path: Path, hidden: int = 32, layers: int = 2, pooling: str = "mean", seed: int = 0) -> Path:
    """A randomly initialised BERT + WordPiece tokenizer folder, with a sentence-transformers pooling config."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *"abcdefghijklmnopqrstuvwxyz.,!?'"]
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)
    # Regression: transformers 5 ignores `vocab_file=`, leaving a 5-token vocab that maps every word to
    # [UNK] (all texts embed identically and the end-to-end tests silently test nothing).
    assert tokenizer.tokenize("the cat plays piano") == ["the", "cat", "plays", "piano"]
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    (path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
            }
        )
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return path


def save_sentence_transformer(hf_dir: Path, path: Path, pooling="mean", include_prompt: bool = True, **kwargs) -> Path:
    """A sentence-transformers folder (Transformer -> Pooling -> Normalize) around a transformers folder;
    kwargs go to SentenceTransformer (prompts, default_prompt_name)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(hf_dir), max_seq_length=32)
    dim = transformer.model.config.hidden_size
    modules = [transformer, Pooling(dim, pooling_mode=pooling, include_prompt=include_prompt), Normalize()]
    SentenceTransformer(modules=modules, device="cpu", **kwargs).save(str(path))
    return path


def _word_level_tokenizer(special: list[str], post: str | None, **kwargs):
    """A word-level fast tokenizer over WORDS (whitespace split, lower-cased), `special` tokens first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys([*special, *sorted(set(WORDS)), *"abcdefghijklmnopqrstuvwxyz"]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post:  # e.g. "$A <|endoftext|>": the EOS every text ends with (Qwen3-Embedding's convention)
        specials = [(t, vocab[t]) for t in special if t in post]
        tok.post_processor = processors.TemplateProcessing(single=post, special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def make_tiny_decoder(
    path: Path, arch: str = "qwen3", pooling="lasttoken", padding_side: str = "left", seed: int = 0, **st_kwargs
) -> Path:
    """A randomly initialised decoder (Qwen3 or Llama, rotary positions) saved as a sentence-transformers
    folder. Qwen3: EOS appended to every text (Qwen3-Embedding's tokenizer); Llama: BOS prepended, no EOS.
    The pad id is not 0."""
    import torch
    from transformers import LlamaConfig, LlamaModel, Qwen3Config, Qwen3Model

    if arch == "qwen3":
        special = ["<unk>", "<|endoftext|>", "<|pad|>"]
        tokenizer = _word_level_tokenizer(
            special,
            "$A <|endoftext|>",
            unk_token="<unk>",
            eos_token="<|endoftext|>",
            pad_token="<|pad|>",
            padding_side=padding_side,
        )
        config_cls, model_cls = Qwen3Config, Qwen3Model
    elif arch == "llama":
        special = ["<unk>", "<s>", "</s>"]
        # Llama has no pad token: EOS pads
        tokenizer = _word_level_tokenizer(
            special,
            "<s> $A",
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="</s>",
            padding_side=padding_side,
        )
        config_cls, model_cls = LlamaConfig, LlamaModel
    else:
        raise ValueError(arch)
    assert tokenizer.pad_token_id != 0 and tokenizer.padding_side == padding_side
    hf_dir = path.with_name(path.name + "-hf")
    tokenizer.save_pretrained(hf_dir)
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_cls(config).save_pretrained(hf_dir)
    return save_sentence_transformer(hf_dir, path, pooling, **st_kwargs)


def make_tiny_mpnet(path: Path, pooling="mean", seed: int = 0) -> Path:
    """A randomly initialised MPNet (pad id 1, positions counted from the padding index) as a
    sentence-transformers folder."""
    import torch
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    hf_dir = path.with_name(path.name + "-hf")
    hf_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["<s>", "<pad>", "</s>", "[UNK]", *sorted(set(WORDS)), *"abcdefghijklmnopqrstuvwxyz", "<mask>"]
    (hf_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = MPNetTokenizerFast(vocab=str(hf_dir / "vocab.txt"), do_lower_case=True)
    assert tokenizer.pad_token_id == 1 and tokenizer.tokenize("the cat") == ["the", "cat"]
    tokenizer.save_pretrained(hf_dir)
    torch.manual_seed(seed)
    config = MPNetConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=1,
    )
    MPNetModel(config).save_pretrained(hf_dir)
    return save_sentence_transformer(hf_dir, path, pooling)


# --- configs --------------------------------------------------------------------------------------------


def load(overrides=()):
    """conf/train.yaml composed with `overrides`, with its hydra node (as the CLI would see it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def tiny_models_and_data(tiny_student, tiny_guide, gist_file, mteb_dir, guide: bool = True) -> list[str]:
    """Overrides for the tiny random BERTs (student, and guide unless guide=False) and the 72-row file."""
    return [
        "data=files",
        f"data.train_files=[{gist_file}]",
        "data.batch_size=8",
        f"data.val_sts_dir={mteb_dir / 'TinySTS'}",
        "data.val_batch_size=8",
        f"model.name={tiny_student}",
        "model.max_length=32",
        *([f"guide.name={tiny_guide}", "guide.max_length=48"] if guide else []),
    ]


def tiny_cfg(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, overrides=()):
    """A job config for `gist.train.train(cfg)` on the tiny fixtures: 4 steps of batch 8, validation on
    TinySTS every 2 steps, CSV logger, output in tmp_path/run, caches in tmp_path/cache. With
    `guide=none` in `overrides` the tiny guide is not set (pass a guide-free loss with it)."""
    cfg = load(
        [
            *tiny_models_and_data(tiny_student, tiny_guide, gist_file, mteb_dir, guide="guide=none" not in overrides),
            f"compare_tasks_dir={mteb_dir}",
            "logger=csv",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1",
            "optim.warmup_steps=1",
            "optim.lr=1e-3",
            *overrides,
        ]
    )
    return as_job(cfg, tmp_path)


def as_job(cfg, tmp_path: Path):
    """A composed config as `@hydra.main` hands it to train(): Hydra's config registered, no `hydra` node,
    output in tmp_path/run and caches in tmp_path/cache."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        del cfg["hydra"]  # as in a @hydra.main app, the job config has no hydra node
    return cfg


def assert_metric(metric) -> float:
    """What `train(cfg)` returns with validation: the best val/stsb_spearman, a float in [-1, 1]."""
    assert isinstance(metric, float) and -1 <= metric <= 1, metric
    return metric


def assert_run_files(run: Path, *, checkpoints: bool = True, model: bool = True, evaluation: bool = False) -> None:
    """What `train(cfg)` wrote in its output folder: config.yaml always; checkpoints/last.ckpt (written
    even by debug=fdr); model/ (the exported sentence-transformers folder) unless export=false;
    eval/comparison.json when compare_tasks_dir is set."""
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file() == checkpoints, list(run.iterdir())
    assert (run / "model" / "modules.json").is_file() == model, list(run.iterdir())
    assert (run / "eval" / "comparison.json").is_file() == evaluation, list(run.iterdir())


# --- scripts/train.py -----------------------------------------------------------------------------------


def tiny(tmp_path, tiny_student, tiny_guide, gist_file, mteb_dir, guide: bool = True, steps: int = 2) -> list[str]:
    """Overrides that make any train.py command tiny: random BERTs, 72 rows, `steps` steps, paths in tmp."""
    return [
        *tiny_models_and_data(tiny_student, tiny_guide, gist_file, mteb_dir, guide=guide),
        "compare_tasks_dir=null",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.log_every_n_steps=1",
        "optim.warmup_steps=1",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]


def with_overrides(args: list[str], overrides: list[str]) -> list[str]:
    """`args` with each `key=value` of `overrides` replacing the same key's argument, else appended."""
    args = list(args)
    for override in overrides:
        key = override.split("=", 1)[0]
        hits = [i for i, a in enumerate(args) if a.split("=", 1)[0] == key]
        if hits:
            args[hits[0]] = override
        else:
            args.append(override)
    return args


def _record_returns_class():
    from hydra.experimental.callback import Callback

    class RecordReturns(Callback):
        """A Hydra callback that appends each job's return value (what a sweeper receives) to a jsonl file."""

        def __init__(self, path: str) -> None:
            self.path = path

        def on_job_end(self, config, job_return, **kwargs) -> None:
            with open(self.path, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "dir": job_return.hydra_cfg.hydra.runtime.output_dir,
                            "overrides": list(job_return.overrides),
                            "value": job_return.return_value,
                        }
                    )
                    + "\n"
                )

    RecordReturns.__module__ = __name__
    RecordReturns.__qualname__ = "RecordReturns"
    return RecordReturns


def _kill_at_step_class():
    import signal

    from lightning.pytorch import Callback

    class KillAtStep(Callback):
        """SIGKILLs the training run (its whole process group: every DDP rank and DataLoader worker, as a
        pre-empted node) when optimizer step `step` is about to start; used by tests/test_resume.py."""

        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == self.step:
                os.killpg(os.getpgid(0), signal.SIGKILL)

    KillAtStep.__module__ = __name__
    KillAtStep.__qualname__ = "KillAtStep"
    return KillAtStep


_LAZY = {"RecordReturns": _record_returns_class, "KillAtStep": _kill_at_step_class}


def __getattr__(name: str):
    """RecordReturns (Hydra) and KillAtStep (Lightning) are built on first use, as `tests.helpers.<name>`
    (what `_target_` in a config names), so importing this module stays cheap."""
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_in_process(args: list[str], monkeypatch, record: Path | None = None) -> None:
    """`python scripts/train.py <args>` in this process (Hydra's real entry point, errors not swallowed).
    With `record`, each job's return value is appended to that jsonl file (RecordReturns)."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    if record is not None:
        args = [
            *args,
            "+hydra.callbacks.record._target_=tests.helpers.RecordReturns",
            f"+hydra.callbacks.record.path={record}",
        ]
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / "train.py"), *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    GlobalHydra.instance().clear()
    try:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()


def run_subprocess(args: list[str], tmp_path: Path, timeout: int = 600, cmd: list[str] | None = None) -> str:
    """`python scripts/train.py <args>` (or `cmd <args>`) as a child process in tmp_path; its output."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(ROOT)}
    cmd = cmd or [sys.executable, str(ROOT / "scripts" / "train.py")]
    proc = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def job_dirs(log_dir: Path, task: str = "quickstart") -> list[Path]:
    """The job folders of the one sweep under <log_dir>/<task>/multiruns, in job order."""
    (sweep,) = (log_dir / task / "multiruns").iterdir()  # exactly one sweep folder
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def recipes() -> dict[str, tuple[dict[str, str], list[str]]]:
    """{name: (env assignments, argv)} from the `# recipe: <name>` lines of README's Recipes section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    found = {}
    for name, command in re.findall(r"^# recipe: (\w+).*\n(.+)$", section, flags=re.M):
        tokens = shlex.split(command)
        env = {}
        while re.match(r"^[A-Z_]+=", tokens[0]):
            key, value = tokens.pop(0).split("=", 1)
            env[key] = value
        found[name] = (env, tokens)
    return found


def recipe(name: str) -> list[str]:
    """The recipe's arguments after `python scripts/train.py`."""
    _, argv = recipes()[name]
    assert argv[:2] == ["python", "scripts/train.py"], argv
    return argv[2:]


# --- run outputs ----------------------------------------------------------------------------------------


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def read_wandb_file(run_dir: Path) -> dict:
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf Records: 7-byte file
    header, then 32 KiB blocks of records with a 7-byte header each, FULL / FIRST..MIDDLE..LAST chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    out = {"run": None, "config": {}, "history_keys": set(), "artifacts": [], "summary": {}, "history": []}
    for r in records:
        which = r.WhichOneof("record_type")
        if which == "run":
            out["run"] = r.run
        elif which == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update if i.key})
        elif which == "history":
            out["history_keys"].update(i.key or "/".join(i.nested_key) for i in r.history.item)
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif which == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif which == "artifact":
            out["artifacts"].append(r.artifact)
    return out


# --- ablation sweeps ------------------------------------------------------------------------------------


def fake_job(sweep: Path, num: int, variant: str, seed: int, scores: dict, base: dict, masked: list[float]) -> Path:
    """One job folder of an ablation sweep as gist.analysis.ablation reads it, with the given scores."""
    import yaml

    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"ablation={variant}", f"seed={seed}", "sweep=ablation"])
    )
    (job / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "seed": seed,
                "task_name": "ablation",
                "loss": {"_target_": "gist.core.loss_modules.GISTLoss", "temperature": 0.01},
                "guide": {"name": "g"},
                "model": {"name": "m"},
                "trainer": {"max_steps": 100},
                "optim": {"lr": 2e-5, "warmup_steps": 10},
                "data": {"batch_size": 16, "train_files": ["train.jsonl"]},
            }
        )
    )
    (job / "csv").mkdir()
    lines = ["step,train/masked_frac,train/effective_negatives"] + [
        f"{i * 10 + 9},{m},{40 - m * 10}" for i, m in enumerate(masked)
    ]
    (job / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    (job / "eval").mkdir()
    (job / "eval" / "fine_tuned.json").write_text(json.dumps(scores))
    (job / "eval" / "base.json").write_text(json.dumps(base))
    # The job's span: .hydra/ written at its start, eval/ at its end (30 s later here).
    start = 1_800_000_000 + 100 * num
    for file in job.rglob("*"):
        if file.is_file():
            os.utime(file, (start + 30, start + 30) if file.parent.name == "eval" else (start, start))
    return job


def make_fake_sweep(root: Path, first_task: str = "T1") -> Path:
    """Two variants x three seeds with hand-picked scores (two tasks): gist_mpnet T1 80, 82, 84 and T2
    60, 61, 65; no_guide T1 79, 80, 84 and T2 60, 62, 65; base T1 70, T2 50. `first_task`: T1's name."""
    sweep = root / "2026-11-27_10-00-00_ablation"
    base = {first_task: 70.0, "T2": 50.0}
    a = [(80.0, 60.0), (82.0, 61.0), (84.0, 65.0)]
    b = [(79.0, 60.0), (80.0, 62.0), (84.0, 65.0)]
    num = 0
    for variant, rows in (("gist_mpnet", a), ("no_guide", b)):
        for seed, (t1, t2) in zip((1, 2, 3), rows):
            fake_job(sweep, num, variant, seed, {first_task: t1, "T2": t2}, base, [0.1 * seed, 0.3 * seed])
            num += 1
    return sweep


class DeviceTensor(torch.Tensor):
    """Stands for a tensor on a GPU: `.cpu()` gives a plain (host) copy, and every read of its values by
    the host (`bool`, `int`, `.item()`, `.tolist()`, ...: a sync on a real GPU) is recorded with its caller."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {})).clone()
        if getattr(func, "__name__", "") in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            import traceback

            cls.reads.append(traceback.extract_stack()[-2].filename)
        return super().__torch_function__(func, types, args, kwargs)


def assert_same_embeddings_and_gradients(ref: dict, got: dict, ref_grads: dict, got_grads: dict) -> None:
    """Two encodings of the same texts by the same function that differ only in fp32 summation order
    (padding widths, batch compositions, packing: padded keys get exactly zero attention).

    Embeddings are unit vectors: rtol 1e-5 + atol 1e-6 (measured <= 3e-8 under ATEN_CPU_CAPABILITY default /
    avx2 / avx512). Gradients: fp32 rounding noise scales with the terms summed in backprop, not with each
    parameter's own gradient; those terms are O(1) in these tests (unit embeddings, |weights| <= 1), so the
    noise is ~1e-6 absolute (measured <= 9.5e-7) and the embedding tables' gradients (~3e-7) are pure
    noise: atol = 1e-4 x the model's largest gradient + 5e-6, rtol 1e-4."""
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], rtol=1e-4, atol=1e-4 * scale + 5e-6, msg=n)

"""What `make bench` measures against: this machine (CPU model and flags, matmul peaks), the FLOPs of a
text through an encoder, and the random decoder student of the `decoder_fp32` key."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def bench_decoder(path: Path) -> Path:
    """A random Qwen3-style decoder of MiniLM's size (6 layers, width 384, rotary, grouped-query attention)
    with MiniLM's tokenizer padded on the left, as a sentence-transformers folder with last-token pooling:
    the decoder student of the `decoder_fp32` key (same pairs and guide as same_work_fp32)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    if (path / "modules.json").is_file():
        return path
    hf = path.with_name(path.name + "-hf")
    tokenizer = AutoTokenizer.from_pretrained(MINILM, padding_side="left")
    tokenizer.save_pretrained(hf)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3Model(config).save_pretrained(hf)
    transformer = Transformer(str(hf), max_seq_length=256)
    modules = [transformer, Pooling(384, pooling_mode="lasttoken"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return path


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def encoder_flops_per_text(name: str, tokens: float) -> float:
    """Forward FLOPs of one text: 2 x (non-embedding params) per token + attention (4 T d per layer)."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(name)
    model = AutoModel.from_pretrained(name)
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    params = sum(p.numel() for p in model.parameters()) - emb
    return tokens * (2 * params + 4 * cfg.num_hidden_layers * tokens * cfg.hidden_size)


def mean_tokens(name: str, texts: list[str]) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    return statistics.mean(len(tok(t)["input_ids"]) for t in texts)


def cpu_info() -> dict:
    """The CPU model and the flags that decide which kernels run (bf16 units: avx512_bf16, amx_bf16)."""
    info = {"cpu": platform.processor() or platform.machine()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info["cpu"] = fields.get("model name", info["cpu"])
        info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
        info["bf16_units"] = bool(flags & {"avx512_bf16", "amx_bf16"})
    return info


def status_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)

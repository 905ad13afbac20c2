"""Back-of-the-envelope plan for a training run: parameters, FLOPs, Chinchilla tokens, time, GPU-hours."""

from __future__ import annotations

from raytrainer.config import Config, ModelConfig
from raytrainer.model.flops import count_params, flops_per_token

# Peak dense bf16 tensor-core FLOP/s per GPU (no sparsity), from the vendors' data sheets.
PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,  # SXM
    "h100-sxm": 989e12,
    "h100-pcie": 756e12,
    "h200": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l40s": 362e12,
    "l4": 121e12,
    "a10g": 125e12,
    "a10": 125e12,
    "v100": 125e12,  # fp16 (no bf16 on Volta)
    "mi300x": 1307e12,
}

CHINCHILLA_TOKENS_PER_PARAM = 20


def peak_flops_for(gpu: str) -> float:
    key = gpu.lower()
    if key not in PEAK_FLOPS:
        raise ValueError(f"unknown GPU {gpu!r}: known are {sorted(PEAK_FLOPS)}; or pass --peak-flops")
    return PEAK_FLOPS[key]


def plan(
    cfg: Config | ModelConfig,
    tokens: float,
    gpus: int,
    mfu: float,
    peak_flops: float | None = None,
    gpu: str = "h100",
    seq_len: int | None = None,
) -> dict:
    """cfg: a whole Config (sequence length and batch from train/data) or just a ModelConfig
    (then seq_len defaults to model.max_seq_len). Curriculum phases: the longest sequence length counts."""
    if tokens <= 0 or gpus <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"plan needs tokens > 0, gpus > 0 and 0 < mfu <= 1; got {tokens=}, {gpus=}, {mfu=}")
    model = cfg.model if isinstance(cfg, Config) else cfg
    if seq_len is None:
        seq_len = max(cfg.phase_seq_lens()) if isinstance(cfg, Config) else model.max_seq_len
    peak = peak_flops if peak_flops is not None else peak_flops_for(gpu)

    params = count_params(model)
    params_non_embedding = count_params(model, include_embeddings=False)
    per_token = flops_per_token(model, seq_len)
    flops = per_token * tokens
    seconds = flops / (gpus * peak * mfu)
    result = {
        "params": params,
        "params_non_embedding": params_non_embedding,
        "seq_len": seq_len,
        "tokens": tokens,
        "flops_per_token": per_token,
        "flops_6nd": 6 * params * tokens,
        "flops": flops,
        "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * params,
        "tokens_per_param": tokens / params,
        "gpu": gpu if peak_flops is None else "custom",
        "gpus": gpus,
        "peak_flops_per_gpu": peak,
        "mfu": mfu,
        "tokens_per_second": gpus * peak * mfu / per_token,
        "wall_seconds": seconds,
        "wall_days": seconds / 86400,
        "gpu_hours": seconds * gpus / 3600,
    }
    if isinstance(cfg, Config):
        result["global_batch_tokens"] = cfg.train.global_batch_tokens
        result["steps"] = tokens / cfg.train.global_batch_tokens
    return result


_SI = ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_COUNT = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def _si(x: float, unit: str = "", prefixes: tuple = _SI) -> str:
    for scale, prefix in prefixes:
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _count(x: float) -> str:
    return _si(x, prefixes=_COUNT)


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:,.1f} days ({seconds / 3600:,.0f} h)"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


def format_plan(p: dict) -> str:
    chinchilla = p["tokens"] / p["chinchilla_tokens"]
    lines = [
        f"parameters        {_count(p['params'])} ({p['params']:,}); "
        f"non-embedding {_count(p['params_non_embedding'])}",
        f"tokens            {_count(p['tokens'])} = {p['tokens_per_param']:.1f} tokens/param "
        f"({chinchilla:.2f}x the Chinchilla-optimal {_count(p['chinchilla_tokens'])})",
        f"training FLOPs    {p['flops']:.3e} at seq_len {p['seq_len']} "
        f"({_si(p['flops_per_token'], 'FLOP')}/token); 6ND gives {p['flops_6nd']:.3e}",
        f"hardware          {p['gpus']} x {p['gpu']} at {_si(p['peak_flops_per_gpu'], 'FLOP/s')} peak, "
        f"MFU {p['mfu']:.0%} -> {_count(p['tokens_per_second'])} tokens/s",
        f"wall time         {_duration(p['wall_seconds'])}",
        f"GPU-hours         {p['gpu_hours']:,.{0 if p['gpu_hours'] >= 100 else 2}f}",
    ]
    if "steps" in p:
        lines.append(f"optimizer steps   {p['steps']:,.0f} at {p['global_batch_tokens']:,} tokens per batch")
    return "\n".join(lines)

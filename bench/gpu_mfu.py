"""Tokens/s and MFU of one device training llama-1b, with each optimisation on and off, side by side.

Variants (each a fresh model and optimizer in this process, the same packed rows of several documents each):

    baseline      eager, torch kernels (RAYTRAINER_KERNELS=torch), logits materialised, no compile
    +kernels      the Triton kernels (RMSNorm, SwiGLU, RoPE, cross-entropy)
    +compile      torch.compile block by block (train.compile), kernels off (inductor fuses the same)
    +chunked      the chunked loss (model.loss.chunk_tokens=4096): no full logits
    +fp8          fp8 linears (torchao), on top of +compile
    all           compile, chunked loss, fp8

MFU counts the attention work actually done under document masking and uses the peak of the dtype in use
(raytrainer.train.metrics); `mfu_dense` is PaLM's convention. Each variant trains --warmup steps untimed (compile
happens there) then --steps timed ones; the median step gives tokens/s. Writes bench/results/gpu_mfu.json.

    .venv/bin/python bench/gpu_mfu.py                         # on one GPU: llama-1b, bf16
    .venv/bin/python bench/gpu_mfu.py --dry-run               # on a CPU: a tiny model, fp32, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from raytrainer.config import load_config  # noqa: E402

LOGITS = "model.loss.chunk_tokens=0"  # the default chunks the loss: the variants that measure without it say so
VARIANTS = {
    "baseline": ({"RAYTRAINER_KERNELS": "torch"}, [LOGITS]),
    "+kernels": ({}, [LOGITS]),
    "+compile": ({"RAYTRAINER_KERNELS": "torch"}, ["train.compile=true", LOGITS]),
    "+chunked": ({"RAYTRAINER_KERNELS": "torch"}, ["model.loss.chunk_tokens=4096"]),
    "+fp8": ({"RAYTRAINER_KERNELS": "torch"}, ["train.compile=true", "precision.dtype=fp8", LOGITS]),
    "all": ({}, ["train.compile=true", "model.loss.chunk_tokens=4096", "precision.dtype=fp8"]),
}
DRY_RUN = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
           "model.multiple_of=32", "model.max_seq_len=128", "train.seq_len=128", "train.global_batch_tokens=512",
           "train.micro_batch_size=2", "precision.dtype=fp32", "train.peak_flops=1e11"]


def packed_rows(rows: int, seq_len: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Rows packed with documents of random lengths (mean seq_len / 4), positions restarting at each."""
    tokens = torch.randint(0, vocab, (rows, seq_len + 1), generator=generator)
    doc_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    position_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        start, doc = 0, 0
        while start < seq_len:
            length = int(torch.randint(1, seq_len // 2, (1,), generator=generator))
            doc_ids[r, start:start + length] = doc
            position_ids[r, start:start + length] = torch.arange(min(length, seq_len - start))
            start, doc = start + length, doc + 1
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": doc_ids, "position_ids": position_ids}


def measure(name: str, overrides: list[str], env: dict[str, str], base: list[str], preset: str | None,
            warmup: int, steps: int, device: torch.device) -> dict:
    from raytrainer.model import Transformer
    from raytrainer.train.engine import StepEngine
    from raytrainer.train.metrics import Throughput
    from raytrainer.train.strategies import build_strategy

    saved = {k: os.environ.get(k) for k in ("RAYTRAINER_KERNELS",)}
    os.environ.pop("RAYTRAINER_KERNELS", None)
    os.environ.update(env)
    try:
        cfg = load_config(preset, [*base, *overrides])
        torch.manual_seed(0)
        strategy = build_strategy(cfg, Transformer(cfg.model), 0, 1, device)
        engine = StepEngine(strategy.model, cfg, strategy)
        throughput = Throughput(cfg, 1, device)
        g = torch.Generator().manual_seed(0)
        seq = cfg.seq_len_at(0)
        micro = [packed_rows(cfg.train.micro_batch_size, seq, cfg.model.vocab_size, g)
                 for _ in range(cfg.accumulation_steps(0, 1))]
        times, mfus = [], []
        for step in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            stats = engine.forward_backward(micro, step)
            engine.apply()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if step >= warmup:
                times.append(seconds)
                mfus.append(throughput.update(stats.tokens, seconds, seq, stats.attended_pairs))
        middle = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]  # a step that happened
        median, step_mfu = times[middle], mfus[middle]
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"variant": name, "tokens_per_s": stats.tokens / median, "mfu": step_mfu["mfu"],
                "mfu_dense": step_mfu["mfu_dense"], "step_s": median, "loss": stats.loss, "peak_gb": peak_gb}
    except Exception as e:  # one variant that cannot run here (no torchao for fp8) must not hide the others
        return {"variant": name, "error": f"{type(e).__name__}: {e}"}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: checks the script runs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    if args.dry_run:
        device, preset, base = torch.device("cpu"), None, DRY_RUN
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu_mfu.py measures a GPU; on a CPU run it with --dry-run")
        device, preset = torch.device("cuda", 0), "llama-1b"
        base = ["precision.dtype=bf16", f"train.micro_batch_size={args.micro_batch}",
                f"train.global_batch_tokens={args.micro_batch * 4096}", "train.seq_len=4096",
                "data.phases=[{start_step: 0}]"]  # the preset's sequence-length warmup off: 4,096 from the start
    rows = []
    for name in args.variants:
        env, overrides = VARIANTS[name]
        if args.dry_run:  # fp8 needs a GPU; compile on a CPU takes minutes: what runs here is the script's path
            overrides = [o for o in overrides if "fp8" not in o and "compile" not in o]
        row = measure(name, overrides, env, base, preset, args.warmup, args.steps, device)
        rows.append(row)
        if "error" in row:
            print(f"{name:10s} did not run: {row['error']}")
        else:
            print(f"{name:10s} {row['tokens_per_s']:10.0f} tokens/s  mfu {row['mfu']:.3f}  "
                  f"(dense {row['mfu_dense']:.3f})  step {row['step_s'] * 1000:.0f} ms"
                  + (f"  peak {row['peak_gb']:.1f} GiB" if row["peak_gb"] is not None else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("gpu_mfu_dry_run.json" if args.dry_run else "gpu_mfu.json")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out.write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Per-step metrics: loss, perplexity, grad norm, lr, tokens/s, MFU, memory.

MFU = achieved training FLOP/s / (peak FLOP/s per device x world size). The achieved FLOPs are 6N per token
plus the attention work actually done: the (query, key) pairs inside each document
(`raytrainer.model.flops.attended_pairs`), so document masking that skips most of the T x T square is not
counted as work. `mfu_dense` is PaLM's convention (the full square, as published MFU figures count it).
The peak per device is `train.peak_flops` when set, else a known GPU's dense tensor-core peak (by its CUDA
name) for the dtype in use (bf16 and fp16 as listed, fp8 twice that, fp32 half of it: TF32), else, on a
CPU, a matmul rate in the dtype in use, measured once per process with the current thread count. A rate
measured while other processes loaded the cores (a job starting up) is too low, and an MFU above 1 proves it:
the meter then measures again and keeps the higher rate (a few times at most).
"""

from __future__ import annotations

import math
import re
import resource
import time

import torch

from raytrainer.config import Config

# bf16 dense (no 2:4 sparsity) tensor-core peak FLOP/s; fp16 for GPUs without bf16. Most specific first:
# the first pattern found in torch.cuda.get_device_name() wins.
GPU_PEAK_FLOPS: list[tuple[str, float]] = [
    (r"\bGH200\b", 989e12),
    (r"\bH200\b", 989e12),
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10G\b", 125e12),
    (r"\bA10\b", 125e12),
    (r"\bA6000\b", 155e12),
    (r"\bRTX 4090\b", 165e12),
    (r"\bV100\b", 125e12),  # fp16
    (r"\bT4\b", 65e12),  # fp16
]


def gpu_peak_flops(name: str) -> float | None:
    for pattern, flops in GPU_PEAK_FLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return flops
    return None


# The dense tensor-core peak of a dtype, relative to the bf16 figures above.
DTYPE_PEAK_FACTOR = {"bf16": 1.0, "fp16": 1.0, "fp8": 2.0, "fp32": 0.5}


def _measure_cpu_matmul_peak(size: int, repeats: int, dtype: torch.dtype) -> float:
    # Grow the matrices until one product takes ~10 ms, up to `size`: a dtype the CPU multiplies slowly
    # (bf16 without native support: ~1 GFLOP/s against ~100 in fp32) is measured in a fraction of a second,
    # not the seconds a 1024-square product takes there, in every process that starts a run.
    n = min(128, size)
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up the BLAS threads
        t0 = time.perf_counter()
        a @ b
        if time.perf_counter() - t0 >= 0.01 or n >= size:
            break
        n = min(2 * n, size)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# the best rate measured so far per (threads, size, repeats, dtype)
_cpu_peaks: dict[tuple, float] = {}


def cpu_matmul_peak(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32,
                    again: bool = False) -> float:
    """What this process's threads do in matmuls of `dtype`: the CPU's practical peak, from products of up to
    `size` squared, as large as takes ~10 ms each. Measured once per process, thread count and dtype (well
    under a second); `again`: measured once more, and the higher of the two rates kept from then on."""
    key = (torch.get_num_threads(), size, repeats, dtype)
    if key not in _cpu_peaks or again:
        _cpu_peaks[key] = max(_cpu_peaks.get(key, 0.0), _measure_cpu_matmul_peak(size, repeats, dtype))
    return _cpu_peaks[key]


def peak_flops(cfg: Config, device: torch.device | None = None) -> float:
    """Peak FLOP/s of one device: train.peak_flops, a known GPU, or the measured CPU matmul rate."""
    if cfg.train.peak_flops is not None:
        return cfg.train.peak_flops
    if device is not None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        if flops is None:
            raise ValueError(f"no peak FLOP/s known for GPU {name!r}: set train.peak_flops to its dense peak "
                             f"FLOP/s in {cfg.precision.dtype} (e.g. train.peak_flops=312e12 for an A100 in bf16) "
                             "to get MFU")
        return flops * DTYPE_PEAK_FACTOR[cfg.precision.dtype]
    return cpu_peak_flops(cfg)


def cpu_peak_flops(cfg: Config, again: bool = False) -> float:
    """The measured matmul rate of this process's threads in the dtype in use (`again`: measured once more)."""
    # A CPU has no fp8 matmul: fp8 layers run their matmuls in bf16 there.
    dtype = torch.float32 if cfg.precision.dtype == "fp32" else torch.bfloat16
    return cpu_matmul_peak(dtype=dtype, again=again)


def memory_gb(device: torch.device | None = None) -> float:
    """Peak memory so far: CUDA max allocated on a GPU, the process's max RSS on a CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(30) so an early or diverging loss does not overflow; NaN stays NaN."""
    return math.exp(min(loss, 30.0)) if math.isfinite(loss) else float("nan")


def _default_device(cfg: Config) -> torch.device:
    if cfg.parallel.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Throughput:
    """tokens/s and MFU of the whole job, from the global tokens of each step and its wall time."""

    def __init__(self, cfg: Config, world_size: int, device: torch.device | None = None):
        self.cfg = cfg
        self.world_size = world_size
        self.device = device if device is not None else _default_device(cfg)
        self._flops_per_token: dict[int, float] = {}
        self._peak: float | None = None
        self._peak_checks_left = 3  # measurements of a CPU peak again after an impossible MFU
        self.total_tokens = 0
        self.total_seconds = 0.0

    def flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._flops_per_token:
            from raytrainer.model.flops import flops_per_token  # the model package is optional here

            self._flops_per_token[seq_len] = flops_per_token(self.cfg.model, seq_len)
        return self._flops_per_token[seq_len]

    @property
    def peak(self) -> float:
        if self._peak is None:
            self._peak = peak_flops(self.cfg, self.device)
        return self._peak

    def _measure_cpu_peak_again(self) -> None:
        """An MFU above 1 on a CPU means its peak was measured low (other processes loading the cores, as at a
        job's start-up): measure it again, keeping the higher rate."""
        if self.cfg.train.peak_flops is not None or self.device.type != "cpu" or self._peak_checks_left <= 0:
            return
        self._peak_checks_left -= 1
        self._peak = cpu_peak_flops(self.cfg, again=True)  # the higher of the rates measured

    def step_flops(self, tokens: int, seq_len: int | None = None, attended_pairs: float = 0.0) -> float:
        """Training FLOPs of a step: 6N per token plus the attention work done (PaLM's full square when the
        attended pairs are not known)."""
        from raytrainer.model.flops import attention_flops, matmul_flops_per_token

        if not attended_pairs:
            return tokens * self.flops_per_token(seq_len or self.cfg.train.seq_len)
        return tokens * matmul_flops_per_token(self.cfg.model) + attention_flops(self.cfg.model, attended_pairs)

    def update(self, tokens: int, seconds: float, seq_len: int | None = None,
               attended_pairs: float = 0.0) -> dict[str, float]:
        """Rates for one step of `tokens` global tokens that took `seconds`; `attended_pairs`: the global
        (query, key) pairs its attention computed (0: unknown, the full square is counted)."""
        if seconds <= 0:
            return {}
        self.total_tokens += tokens
        self.total_seconds += seconds
        rate = tokens / seconds
        dense = rate * self.flops_per_token(seq_len or self.cfg.train.seq_len)
        achieved = self.step_flops(tokens, seq_len, attended_pairs) / seconds
        if achieved > self.peak * self.world_size:
            self._measure_cpu_peak_again()
        return {
            "tokens_per_s": rate,
            "tokens_per_s_per_device": rate / self.world_size,
            "mfu": achieved / (self.peak * self.world_size),
            "mfu_dense": dense / (self.peak * self.world_size),
            "step_time_s": seconds,
            "memory_gb": memory_gb(self.device),
        }

    def average_tokens_per_s(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


def step_metrics(stats, lr: float, throughput: Throughput | None = None) -> dict[str, float]:
    """One flat dict for logs and reports from a StepStats (and the rates, when a meter is given)."""
    out = {
        "step": stats.step,
        "loss": stats.loss,
        "perplexity": perplexity(stats.loss),
        "grad_norm": stats.grad_norm,
        "lr": lr,
        "tokens": stats.tokens,
        "label_tokens": stats.label_tokens,
    }
    if throughput is not None:
        out.update(throughput.update(stats.tokens, stats.time_s, stats.seq_len))
    return out

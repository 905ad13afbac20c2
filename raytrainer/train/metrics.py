"""Per-step rates: tokens/s, MFU against the device's peak, memory."""

from __future__ import annotations

import functools
import resource
import time

import torch

from raytrainer.config import Config

# bf16 dense peak FLOP/s per device (no sparsity)
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10G": 125e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


@functools.cache
def cpu_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """What this process's threads can do in float32 matmuls, measured once: the CPU's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def peak_flops(cfg: Config, device: torch.device | None = None) -> float:
    if cfg.train.peak_flops is not None:
        return cfg.train.peak_flops
    if device is not None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        raise ValueError(f"unknown GPU {name!r}: set train.peak_flops to its bf16 dense peak FLOP/s for MFU")
    return cpu_matmul_peak()


def memory_gb(device: torch.device | None = None) -> float:
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class Throughput:
    """tokens/s and MFU of the whole job, from the global tokens of each step and its wall time."""

    def __init__(self, cfg: Config, world_size: int, device: torch.device | None = None):
        from raytrainer.model.flops import flops_per_token

        self.cfg = cfg
        self.world_size = world_size
        self.device = device
        self._flops_per_token = {}
        self._flops = flops_per_token
        self._peak: float | None = None

    def flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = self._flops(self.cfg.model, seq_len)
        return self._flops_per_token[seq_len]

    def update(self, tokens: int, seconds: float, seq_len: int | None = None) -> dict[str, float]:
        if seconds <= 0:
            return {}
        if self._peak is None:
            self._peak = peak_flops(self.cfg, self.device)
        rate = tokens / seconds
        achieved = rate * self.flops_per_token(seq_len or self.cfg.train.seq_len)
        return {
            "tokens_per_s": rate,
            "mfu": achieved / (self._peak * self.world_size),
            "step_time_s": seconds,
            "memory_gb": memory_gb(self.device),
        }

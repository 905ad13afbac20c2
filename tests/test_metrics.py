"""Per-step metrics: GPU peaks by name, the measured CPU peak, MFU arithmetic, perplexity, memory."""

from __future__ import annotations

import math

import pytest
import torch

from raytrainer.config import load_config
from raytrainer.model.flops import flops_per_token
from raytrainer.train.engine import StepStats
from raytrainer.train.metrics import (
    Throughput,
    cpu_matmul_peak,
    gpu_peak_flops,
    memory_gb,
    peak_flops,
    perplexity,
    step_metrics,
)


@pytest.mark.parametrize(("name", "flops"), [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10G", 125e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),
    ("Tesla T4", 65e12),
    ("Some Future Accelerator", None),
])
def test_gpu_peaks_by_device_name(name, flops):
    assert gpu_peak_flops(name) == flops


def test_peak_override_and_measured_cpu_peak():
    assert peak_flops(load_config(None, ["train.peak_flops=1.5e12"])) == 1.5e12
    measured = cpu_matmul_peak()
    assert 1e8 < measured < 1e14  # some plausible CPU rate
    assert cpu_matmul_peak() == measured  # once per process (and thread count)
    assert peak_flops(load_config(None, [])) == measured


def test_throughput_tokens_per_second_and_mfu():
    cfg = load_config("tiny", ["train.peak_flops=1e12"])
    meter = Throughput(cfg, world_size=2)
    rates = meter.update(tokens=8192, seconds=2.0, seq_len=128)
    assert rates["tokens_per_s"] == 4096
    assert rates["tokens_per_s_per_device"] == 2048
    assert rates["mfu"] == pytest.approx(4096 * flops_per_token(cfg.model, 128) / (1e12 * 2))
    assert rates["memory_gb"] > 0
    meter.update(tokens=8192, seconds=6.0)
    assert meter.average_tokens_per_s() == pytest.approx(16384 / 8.0)
    assert meter.update(tokens=1, seconds=0.0) == {}


def test_perplexity_and_step_metrics():
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e6) == pytest.approx(math.exp(30.0))
    assert math.isnan(perplexity(float("nan")))
    cfg = load_config("tiny", ["train.peak_flops=1e12"])
    stats = StepStats(step=3, loss=math.log(10.0), grad_norm=0.5, finite=True, tokens=8192, label_tokens=8000,
                      time_s=0.5, seq_len=256)
    out = step_metrics(stats, lr=1e-3, throughput=Throughput(cfg, world_size=1))
    assert out["perplexity"] == pytest.approx(10.0)
    assert out["grad_norm"] == 0.5 and out["lr"] == 1e-3 and out["step"] == 3
    assert out["tokens_per_s"] == 16384
    assert out["mfu"] == pytest.approx(16384 * flops_per_token(cfg.model, 256) / 1e12)


def test_memory_is_reported():
    assert memory_gb(torch.device("cpu")) > 0.01

"""Per-step metrics: GPU peaks by name, the measured CPU peak, MFU arithmetic, perplexity, memory."""

from __future__ import annotations

import math

import pytest
import torch

from raytrainer.config import load_config
from raytrainer.model.flops import attended_pairs, flops_per_token
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
    assert peak_flops(load_config(None, ["precision.dtype=fp32"])) == measured
    # In the dtype in use: bf16 matmuls are another rate on a CPU (fp8 layers multiply in bf16 there).
    bf16 = cpu_matmul_peak(dtype=torch.bfloat16)
    assert peak_flops(load_config(None, ["precision.dtype=bf16"])) == bf16


def test_a_gpus_peak_is_that_of_the_dtype_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    peaks = {d: peak_flops(load_config(None, [f"precision.dtype={d}"]), cuda) for d in ("bf16", "fp8", "fp32")}
    assert peaks == {"bf16": 989e12, "fp8": 2 * 989e12, "fp32": 989e12 / 2}


def test_a_cpu_peak_measured_under_load_is_measured_again_once_mfu_exceeds_one(monkeypatch):
    from raytrainer.train import metrics

    # measured while a job's other processes loaded the cores: 1 GFLOP/s; then unloaded: 100, then loaded again
    rates = iter([1e9, 100e9, 5e9, 100e9, 100e9])
    monkeypatch.setattr(metrics, "_measure_cpu_matmul_peak", lambda *args: next(rates))
    monkeypatch.setattr(metrics, "_cpu_peaks", {})
    cfg = load_config("tiny", ["precision.dtype=fp32"])
    meter = Throughput(cfg, world_size=1, device=torch.device("cpu"))
    seq = 128
    tokens = int(10e9 / flops_per_token(cfg.model, seq))  # 10 GFLOP in one second: impossible at 1 GFLOP/s
    first = meter.update(tokens=tokens, seconds=1.0, seq_len=seq)
    assert meter.peak == 100e9 and first["mfu"] == pytest.approx(0.1, rel=1e-3)  # the step reads the new peak
    assert meter.update(tokens=tokens, seconds=1.0, seq_len=seq)["mfu"] == pytest.approx(0.1, rel=1e-3)
    assert cpu_matmul_peak(again=True) == 100e9  # a lower rate measured again never lowers the peak
    # A given peak, or one that an MFU under 1 does not contradict, is never measured again.
    assert Throughput(load_config("tiny", ["train.peak_flops=1e9"]), 1).update(tokens, 1.0, seq)["mfu"] > 1
    assert next(rates) == 100e9


def test_attention_work_is_counted_inside_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, 2, 2]])
    assert attended_pairs(doc_ids, (2, 5)) == (6 + 3) + 15  # 3 and 2 causal tokens; 5
    assert attended_pairs(doc_ids, (2, 5), causal=False) == (9 + 4) + 25
    assert attended_pairs(None, (2, 5)) == 2 * 15  # no document ids: each row one document
    # A document cut at a row's end is two stretches of work, one per row.
    assert attended_pairs(torch.tensor([[7, 7], [7, 7]]), (2, 2)) == 3 + 3


def test_mfu_counts_the_attention_done_and_mfu_dense_the_full_square():
    cfg = load_config("tiny", ["train.peak_flops=1e12"])
    meter = Throughput(cfg, world_size=1)
    m, seq = cfg.model, 256
    rows = 4
    one_doc = rows * seq * (seq + 1) // 2
    short_docs = rows * (seq // 16) * (16 * 17 // 2)  # 16 documents of 16 tokens a row
    full = meter.update(tokens=rows * seq, seconds=1.0, seq_len=seq, attended_pairs=one_doc)
    short = meter.update(tokens=rows * seq, seconds=1.0, seq_len=seq, attended_pairs=short_docs)
    attention = 12 * m.n_layers * m.n_heads * m.head_dim
    six_n = flops_per_token(m, seq) - attention * seq
    assert full["mfu"] == pytest.approx((rows * seq * six_n + attention * one_doc) / 1e12)
    assert short["mfu"] == pytest.approx((rows * seq * six_n + attention * short_docs) / 1e12)
    assert short["mfu"] < full["mfu"] < full["mfu_dense"] == short["mfu_dense"]
    assert full["mfu_dense"] == pytest.approx(rows * seq * flops_per_token(m, seq) / 1e12)


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

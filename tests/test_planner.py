"""`raytrainer plan` numbers: parameters, FLOPs, Chinchilla tokens, wall time and GPU-hours."""

import pytest

from raytrainer.config import load_config
from raytrainer.model.flops import count_params, flops_per_token
from raytrainer.planner import PEAK_FLOPS, format_plan, plan


def test_llama_8b_plan():
    cfg = load_config("llama-8b")
    p = plan(cfg, tokens=15e12, gpus=1024, mfu=0.4)
    n = count_params(cfg.model)
    assert p["params"] == n == pytest.approx(8.03e9, rel=1e-3)
    assert p["params_non_embedding"] == pytest.approx(6.98e9, rel=1e-3)
    assert p["seq_len"] == 8192
    assert p["flops_6nd"] == 6 * n * 15e12
    assert p["flops"] == flops_per_token(cfg.model, 8192) * 15e12
    assert p["chinchilla_tokens"] == 20 * n
    assert p["tokens_per_param"] == pytest.approx(15e12 / n)
    assert p["peak_flops_per_gpu"] == 989e12
    assert p["wall_seconds"] == pytest.approx(p["flops"] / (1024 * 989e12 * 0.4))
    assert p["gpu_hours"] == pytest.approx(p["wall_seconds"] * 1024 / 3600)
    assert p["steps"] == pytest.approx(15e12 / 4194304)
    assert 0.5e6 < p["gpu_hours"] < 0.7e6  # Meta reports ~1.3M H100-hours for Llama 3 8B at lower MFU


def test_gpu_table_override_and_model_only_config():
    cfg = load_config("llama-8b")
    a100 = plan(cfg, tokens=1e12, gpus=8, mfu=0.5, gpu="A100")
    h100 = plan(cfg, tokens=1e12, gpus=8, mfu=0.5, gpu="h100")
    ratio = PEAK_FLOPS["h100"] / PEAK_FLOPS["a100"]
    assert a100["wall_seconds"] / h100["wall_seconds"] == pytest.approx(ratio)
    custom = plan(cfg, tokens=1e12, gpus=8, mfu=0.5, peak_flops=1e15)
    assert custom["peak_flops_per_gpu"] == 1e15 and custom["gpu"] == "custom"
    only_model = plan(cfg.model, tokens=1e12, gpus=8, mfu=0.5)
    assert only_model["seq_len"] == cfg.model.max_seq_len and "steps" not in only_model
    with pytest.raises(ValueError, match="unknown GPU 'tpu'.*h100"):
        plan(cfg, tokens=1e12, gpus=8, mfu=0.5, gpu="tpu")
    with pytest.raises(ValueError, match="mfu"):
        plan(cfg, tokens=1e12, gpus=8, mfu=1.5)


def test_format_plan_reads_well():
    text = format_plan(plan(load_config("llama-8b"), tokens=15e12, gpus=1024, mfu=0.4))
    assert "8.03B" in text and "Chinchilla" in text and "GPU-hours" in text and "days" in text
    assert "1024 x h100" in text

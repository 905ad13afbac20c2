"""Mixed precision: autocast per dtype, the fp16 loss scaler on its own and through the engine, fp8 errors."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import build, grads, make_batch, params, tiny_config

from raytrainer.config import PrecisionConfig
from raytrainer.train.precision import DynamicLossScaler, autocast, check_precision_supported, enable_fp8

CPU = torch.device("cpu")


def test_autocast_per_dtype_keeps_fp32_master_weights():
    a = torch.randn(8, 8)
    for dtype, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(dtype, CPU):
            assert (a @ a).dtype == expected, dtype
    cfg = tiny_config("precision.dtype=bf16")
    strategy, engine = build(cfg)
    engine.train_step([make_batch(cfg, rows=2)], step=0)
    assert all(p.dtype == torch.float32 for p in strategy.module.parameters())
    with pytest.raises(ValueError, match="precision.dtype='int8'"):
        autocast("int8", CPU)


# ---------------------------------------------------------------------------------------------- the scaler


def scaler(**kw) -> DynamicLossScaler:
    return DynamicLossScaler(PrecisionConfig(dtype="fp16", **kw))


def test_scaler_halves_on_overflow_down_to_the_floor_and_grows_after_clean_steps():
    s = scaler(initial_loss_scale=8.0, loss_scale_growth_interval=3, min_loss_scale=2.0)
    s.update(found_inf=True)
    assert s.scale == 4.0
    s.update(found_inf=True)
    s.update(found_inf=True)
    assert s.scale == 2.0  # floor
    for _ in range(2):
        s.update(found_inf=False)
    assert s.scale == 2.0  # not yet: growth_interval clean steps in a row
    s.update(found_inf=False)
    assert s.scale == 4.0
    s.update(found_inf=False)
    s.update(found_inf=False)
    s.update(found_inf=True)  # an overflow restarts the clean count
    for _ in range(2):
        s.update(found_inf=False)
    assert s.scale == 2.0
    assert s.overflows == 4


def test_scaler_state_roundtrip_and_other_precisions():
    s = scaler(initial_loss_scale=1024.0)
    s.update(found_inf=True)
    s.update(found_inf=False)
    restored = scaler()
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict() == {"enabled": True, "scale": 512.0, "clean_steps": 1,
                                                        "overflows": 1}
    bf16 = DynamicLossScaler(PrecisionConfig(dtype="bf16"))
    assert not bf16.enabled and bf16.scale == 1.0
    bf16.update(found_inf=True)
    assert bf16.scale == 1.0
    fresh = scaler(initial_loss_scale=1024.0)
    fresh.load_state_dict(bf16.state_dict())  # a bf16 checkpoint does not set an fp16 run's scale to 1
    assert fresh.scale == 1024.0


# ---------------------------------------------------------------------------------------------- through the engine


def test_fp16_step_scales_the_loss_and_unscales_before_the_norm_and_clipping():
    batch = make_batch(tiny_config(), rows=2)
    fp32, fp32_engine = build(tiny_config())
    reference = fp32_engine.forward_backward([batch], step=0)
    fp16, engine = build(tiny_config("precision.dtype=fp16", "precision.initial_loss_scale=1024"))
    stats = engine.forward_backward([batch], step=0)
    assert stats.metrics["loss_scale"] == 1024.0
    assert stats.finite and not stats.overflow
    assert stats.loss == pytest.approx(reference.loss, rel=1e-3)
    assert stats.grad_norm == pytest.approx(reference.grad_norm, rel=2e-2)  # unscaled: not 1024x
    expected = grads(fp32)
    for name, g in grads(fp16).items():
        torch.testing.assert_close(g, expected[name], rtol=0.1, atol=2e-3, msg=name)
    assert engine.apply() is True


def test_fp16_overflow_skips_the_step_and_halves_the_scale_then_grows_it_back():
    cfg = tiny_config("precision.dtype=fp16", f"precision.initial_loss_scale={2.0**200}",
                      "precision.loss_scale_growth_interval=2")
    strategy, engine = build(cfg)
    before = params(strategy)
    batch = [make_batch(cfg, rows=2)]
    stats = engine.train_step(batch, step=0)  # loss x 2^200 is inf in fp32: every gradient overflows
    assert stats.overflow and not stats.finite and stats.applied is False
    assert math.isfinite(stats.loss) and not math.isfinite(stats.grad_norm)
    assert all(torch.equal(before[n], p) for n, p in params(strategy).items())
    assert strategy.optimizer.state_dict()["state"] == {}
    assert engine.scaler.scale == 2.0**199

    engine.scaler.scale = 256.0  # a scale that fits: steps apply, and two clean ones double it
    for step in (1, 2):
        assert engine.train_step(batch, step).applied
    assert engine.scaler.scale == 512.0
    assert engine.state_dict()["scaler"]["overflows"] == 1


# ---------------------------------------------------------------------------------------------- fp8


def test_fp8_without_a_capable_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="precision.dtype=fp8 needs a CUDA GPU with compute capability >= 8.9"):
        check_precision_supported("fp8", CPU)
    check_precision_supported("bf16", CPU)  # CPUs run bf16 autocast
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="precision.dtype=fp8.*Use precision.dtype=bf16"):
            enable_fp8(torch.nn.Linear(16, 16))
        with pytest.raises(RuntimeError, match="precision.dtype=fp8 needs a CUDA GPU"):
            build(tiny_config("precision.dtype=fp8"))  # model setup refuses before any step

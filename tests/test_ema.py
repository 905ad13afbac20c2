"""EMA of the weights: the update rule, fp32 shadow, swapping in for eval, state, and the engine's use."""

from __future__ import annotations

import pytest
import torch
from test_engine import build, make_batch, params, tiny_config

from raytrainer.train.ema import EMA


def test_ema_follows_the_update_rule_after_each_update():
    model = torch.nn.Linear(3, 2)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for n in p0:
        torch.testing.assert_close(ema.shadow[n], 0.9 * p0[n] + 0.1 * (p0[n] + 1.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for n in p0:  # 0.9 * (p0 + 0.1) + 0.1 * (p0 + 2)
        torch.testing.assert_close(ema.shadow[n], p0[n] + 0.29)


def test_shadow_is_fp32_and_outside_the_gradient_path():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in ema.shadow.values())
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update()
    assert ema.shadow["weight"].dtype == torch.float32


def test_swapped_in_evaluates_with_ema_weights_and_restores_training_weights_even_on_error():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.5)
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in ema.shadow.values():
        t.fill_(0.25)
    with ema.swapped_in():
        assert all(torch.all(p == 0.25) for p in model.parameters())
    assert all(torch.equal(p, training[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in():
        raise RuntimeError("boom")
    assert all(torch.equal(p, training[n]) for n, p in model.named_parameters())


def test_state_dict_roundtrip_and_mismatched_state_is_refused():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    saved = {n: torch.full_like(t, 7.0) for n, t in ema.state_dict().items()}
    other = EMA(torch.nn.Linear(3, 3), decay=0.9)
    other.load_state_dict(saved)
    assert all(torch.equal(other.shadow[n], saved[n]) for n in saved)
    with pytest.raises(KeyError, match="missing \\['bias'\\]"):
        other.load_state_dict({"weight": saved["weight"]})
    with pytest.raises(ValueError, match="train.ema_decay=1.5"):
        EMA(model, decay=1.5)


def test_engine_updates_the_ema_only_on_applied_steps():
    cfg = tiny_config("train.ema_decay=0.5")
    strategy, engine = build(cfg)
    start = params(strategy)
    batch = [make_batch(cfg, rows=2)]
    engine.forward_backward(batch, step=0)
    engine.apply(skip=True)
    assert all(torch.equal(engine.ema.shadow[n], start[n]) for n in start)
    engine.train_step(batch, step=1)
    after = params(strategy)
    for n in start:
        torch.testing.assert_close(engine.ema.shadow[n], 0.5 * start[n] + 0.5 * after[n])

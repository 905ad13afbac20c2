"""Mixture of experts: routing, dispatch against a per-token reference, both balancing methods, capacity, the
router z-loss, active-parameter FLOPs, and a moe-tiny model that trains through the step engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytrainer.config import ConfigError, load_config
from raytrainer.model import Transformer
from raytrainer.model.flops import count_params, matmul_params
from raytrainer.model.moe import MoE, update_balance_bias

SMALL = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.multiple_of=16",
         "model.max_seq_len=32", "train.seq_len=32", "train.global_batch_tokens=256", "train.micro_batch_size=4",
         "precision.dtype=fp32"]


def moe_config(**moe):
    settings = {"n_experts": 4, "top_k": 2, "expert_hidden": 24, **moe}
    text = "{" + ", ".join(f"{k}: {'null' if v is None else v}" for k, v in settings.items()) + "}"
    return load_config(None, [*SMALL, f"model.moe={text}"])


def layer(seed: int = 0, **moe) -> MoE:
    torch.manual_seed(seed)
    return Transformer(moe_config(**moe).model).layers[0].mlp


def expert(m: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    w = m.experts
    return F.linear(F.silu(F.linear(x, w.gate_proj[e])) * F.linear(x, w.up_proj[e]), w.down_proj[e])


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_every_token_gets_its_top_k_experts_weighted_by_renormalised_scores(score):
    for shared in (0, 1):
        m = layer(shared_experts=shared, score=score)
        x = torch.randn(2, 7, 32)
        y = m(x)
        h = x.reshape(-1, 32)
        logits = m.router.gate(h)
        scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
        want = torch.zeros_like(h)
        for t in range(h.shape[0]):  # one token at a time, the plain way
            top = scores[t].topk(2)
            for w, e in zip(top.values / top.values.sum(), top.indices, strict=True):
                want[t] += w * expert(m, int(e), h[t])
        if shared:
            want += m.shared(h)
        torch.testing.assert_close(y.reshape(-1, 32), want, rtol=1e-5, atol=1e-6)
        assert int(m.stats.load.sum()) == 2 * h.shape[0] and int(m.stats.dropped) == 0


def test_balancing_loss_and_router_z_loss_are_the_published_formulas():
    m = layer()
    h = torch.randn(40, 32)
    m(h[None])
    logits = m.router.gate(h)
    scores = logits.softmax(-1)
    chosen = scores.topk(2).indices
    fraction = torch.stack([(chosen == e).any(-1).float().mean() / 2 for e in range(4)])
    torch.testing.assert_close(m.stats.aux_loss, 4 * (fraction * scores.mean(0)).sum())
    torch.testing.assert_close(m.stats.z_loss, torch.logsumexp(logits, -1).square().mean())
    assert torch.equal(m.stats.load, torch.bincount(chosen.reshape(-1), minlength=4))


def skewed(m: MoE) -> None:
    """A router that sends almost everything to expert 0 and 1."""
    with torch.no_grad():
        m.router.gate.weight[:2] += 0.2 * m.router.gate.weight[:2].sign()


def imbalance(m: MoE, h: torch.Tensor) -> float:
    m(h[None])
    return float(m.stats.load.max() / m.stats.load.float().mean())


def test_the_balancing_loss_evens_out_a_skewed_router():
    m = layer()
    skewed(m)
    h = torch.randn(256, 32).abs()
    before = imbalance(m, h)
    opt = torch.optim.Adam(m.router.parameters(), lr=0.01)
    for _ in range(40):
        m(h[None])
        opt.zero_grad()
        m.stats.aux_loss.backward()
        opt.step()
    assert float(m.stats.aux_loss) < 1.05  # 1 is a perfectly even load
    assert before > 1.5 and imbalance(m, h) < 1.2


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_balancing_evens_out_a_skewed_router_without_gradients(score):
    m = layer(balance="bias", score=score)
    skewed(m)
    h = torch.randn(256, 32).abs()
    before = imbalance(m, h)
    weights = m.router.gate.weight.clone()
    for _ in range(60):
        m(h[None])
        assert float(m.stats.aux_loss) == 0.0  # no auxiliary loss with this method
        update_balance_bias(m, m.stats.load[None].double(), rate=0.01)
    assert torch.equal(m.router.gate.weight, weights)
    assert before > 1.5 and imbalance(m, h) < 1.2
    # the bias steers the choice only: the chosen experts' weights are still their renormalised scores
    m(h[None])
    logits = m.router.gate(h)
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    chosen = (scores + m.router.bias).topk(2).indices
    assert not torch.equal(chosen, scores.topk(2).indices)


def test_capacity_drops_an_experts_slots_beyond_it_in_token_order():
    m = layer(capacity_factor=0.5)  # 12 tokens, 2 slots each, 4 experts: 3 slots per expert
    skewed(m)
    h = torch.randn(12, 32).abs()
    y = m(h[None]).reshape(-1, 32)
    load = m.stats.load
    assert int(m.stats.dropped) == int((load - 3).clamp(min=0).sum()) > 0
    scores = m.router.gate(h).softmax(-1)
    top = scores.topk(2)
    taken = torch.zeros(4, dtype=torch.long)
    want = torch.zeros_like(h)
    for t in range(12):
        for w, e in zip(top.values[t] / top.values[t].sum(), top.indices[t], strict=True):
            if taken[e] < 3:  # first come, first served
                want[t] += w * expert(m, int(e), h[t])
            taken[e] += 1
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_flops_count_active_experts_and_parameters_count_them_all():
    cfg = moe_config(shared_experts=1).model
    model = Transformer(cfg)
    assert count_params(cfg) == model.num_params()
    dense = load_config(None, [*SMALL, "model.ffn_hidden=24"]).model
    # a token goes through the router, 2 routed experts and 1 shared: 3 expert MLPs, not 4 + 1
    per_layer = (matmul_params(cfg) - matmul_params(dense)) // cfg.n_layers
    assert per_layer == 2 * 3 * 32 * 24 + 32 * 4
    assert "layers.0.mlp.router.bias" in model.state_dict()  # the balancing bias is checkpointed


@pytest.mark.parametrize("overrides,message", [
    (["model.moe={n_experts: 2, top_k: 3}"], r"model.moe.top_k=3 exceeds model.moe.n_experts=2"),
    (["model.moe={n_experts: 4}", "model.lora={targets: [q_proj, up_proj]}"], r"model.lora.targets=.*up_proj"),
    (["model.moe={n_experts: 4}", "parallel.strategy=fsdp", "parallel.tp=2", "parallel.min_workers=2",
      "parallel.max_workers=2"], r"model.moe with parallel.tp=2 is not supported"),
])
def test_mixture_of_experts_settings_are_checked_with_named_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*SMALL, *overrides])


def batch(step: int, rows: int = 8, seq: int = 32) -> dict:
    """Rows that run through the alphabet from a random letter: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 26, (rows, 1), generator=g)
    tokens = (start + torch.arange(seq + 1)) % 26 + 1
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()}


@pytest.mark.parametrize("balance", ["aux_loss", "bias"])
def test_a_mixture_of_experts_model_trains_and_reports_its_routing(balance):
    from raytrainer.train.engine import StepEngine
    from raytrainer.train.strategy import SingleProcess

    cfg = load_config("moe-tiny", ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                                   "model.moe.expert_hidden=64", f"model.moe.balance={balance}",
                                   "train.seq_len=32", "train.global_batch_tokens=256", "schedule.warmup_steps=2"])
    torch.manual_seed(0)
    strategy = SingleProcess(cfg, Transformer(cfg.model))
    engine = StepEngine(strategy.model, cfg, strategy)
    routers = [b.mlp.router for b in strategy.module.layers]
    losses = []
    for step in range(30):
        bias = [r.bias.clone() for r in routers]
        stats = engine.forward_backward([batch(step)], step)
        engine.apply(skip=step == 5)
        losses.append(stats.loss)
        assert stats.metrics["moe_max_load"] >= 1.0 >= stats.metrics["moe_min_load"] >= 0.0
        assert stats.metrics["moe_dropped"] == 0.0
        moved = any(not torch.equal(b, r.bias) for b, r in zip(bias, routers, strict=True))
        assert moved == (balance == "bias" and step != 5)  # a skipped step leaves the balance as it was
        assert (stats.metrics["moe_aux_loss"] > 0) == (balance == "aux_loss")
    assert losses[-1] < losses[0] - 1.0


def test_activation_checkpointing_recomputes_experts_to_the_same_loss_and_gradients():
    from raytrainer.model.checkpointing import apply_activation_checkpointing

    results = []
    for mode in ("none", "full"):
        cfg = moe_config(shared_experts=1)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing.model_copy(update={"mode": mode}))
        out = model(**batch(0))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_ac, grads_ac) = results
    assert torch.equal(loss, loss_ac)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ac[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    assert grads["layers.0.mlp.router.gate.weight"].abs().sum() > 0  # the balancing terms reach the router


def test_a_mixture_of_experts_is_not_exported_as_a_dense_model(tmp_path):
    from raytrainer.export import export_hf
    from raytrainer.hf.architecture import ExportRefused

    with pytest.raises(ExportRefused, match=r"model.moe \(a mixture of 4 experts\) has no Hugging Face export"):
        export_hf(moe_config(), str(tmp_path / "run"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_dense_hugging_face_model_is_not_imported_into_experts(tmp_path):
    import json

    from raytrainer.hf.weights import ImportRefused, check_hf_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ImportRefused, match=r"is a dense llama model, but model.moe makes a mixture of experts"):
        check_hf_config(moe_config().model, tmp_path)

"""Expert parallel (parallel.ep) on gloo ranks: experts split over ranks, tokens dispatched by all-to-all, the
same losses and gradients as one process holding every expert, and checkpoints that load without it."""

from __future__ import annotations

import pytest
import torch

from strategy_harness import (
    build,
    first_step_gradients,
    load_result,
    merge_rank_dirs,
    probe_batch,
    probe_logits,
    save_result,
    spawn,
    tiny_config,
    train_steps,
)

STEPS = range(4)
MOE = ["model.moe={n_experts: 4, top_k: 2, expert_hidden: 48, capacity_factor: null}"]


def ep_config(ep: int, *extra: str):
    return tiny_config("ddp", *MOE, f"parallel.ep={ep}", "parallel.min_workers=2", "parallel.max_workers=2", *extra)


def run_experts_split(rank: int, world_size: int, out_dir, balance: str) -> None:
    """The same two ranks with the experts split (ep=2) and whole on each (ep=1): the balancing and z-losses
    are taken over each micro-batch's tokens, so the reference must split the rows the same way."""
    for ep in (2, 1):
        cfg = ep_config(ep, f"model.moe.balance={balance}")
        strategy, engine = build(cfg, rank, world_size)
        experts = strategy.module.layers[0].mlp.experts.gate_proj
        held = (experts.to_local() if ep > 1 else experts).shape[0]
        grads = first_step_gradients(engine, cfg, rank)
        curve = torch.tensor(train_steps(engine, cfg, STEPS, rank, world_size))
        bias = strategy.module.layers[0].mlp.router.bias.clone()
        if ep > 1:
            engine.save_checkpoint(out_dir / "ckpt" / f"rank{rank}")
        save_result(out_dir, f"{balance}-ep{ep}", rank, {"grads": grads, "curve": curve, "held": held,
                                                          "bias": bias, "logits": probe_logits(strategy, cfg)})


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["aux_loss", "bias"])
def test_experts_split_over_two_ranks_train_as_whole_experts_do(balance, tmp_path):
    spawn(run_experts_split, 2, tmp_path, balance)
    runs = [load_result(tmp_path, f"{balance}-ep2", rank) for rank in range(2)]
    reference = load_result(tmp_path, f"{balance}-ep1")
    assert [r["held"] for r in runs] == [2, 2] and reference["held"] == 4  # each rank holds half the experts
    assert torch.equal(runs[0]["curve"], runs[1]["curve"])
    assert (reference["curve"][:, 1] > 0.5).all()  # above the clip threshold: every step exercised clipping
    torch.testing.assert_close(runs[0]["curve"], reference["curve"], rtol=2e-5, atol=2e-6)
    assert runs[0]["grads"].keys() == reference["grads"].keys()
    for name, grad in runs[0]["grads"].items():
        torch.testing.assert_close(grad, reference["grads"][name], rtol=1e-4, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(runs[0]["bias"], reference["bias"])  # the balancing bias saw every rank's load
    assert (runs[0]["bias"].abs().sum() > 0) == (balance == "bias")

    # the split experts' checkpoint, read whole in one process (export, generate, a run with ep=1)
    from raytrainer.model import Transformer
    from raytrainer.train.strategies import load_full_state_dict

    cfg = ep_config(2, f"model.moe.balance={balance}")
    merged = merge_rank_dirs(sorted((tmp_path / "ckpt").iterdir()), tmp_path / "merged")
    model = Transformer(cfg.model)
    model.load_state_dict(load_full_state_dict(cfg, model, merged))
    with torch.no_grad():
        torch.testing.assert_close(model(probe_batch(cfg)).logits, runs[0]["logits"], rtol=1e-5, atol=1e-5)

"""FSDP2 behind the Strategy interface: sharded DTensor parameters, no gradient reduction before the last
micro-step, the precision policy, meta-device initialisation, and DCP checkpoints that reload with
identical outputs on 2 -> 1 and 1 -> 2 ranks (EMA included)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from raytrainer.train.fsdp import mixed_precision_policy
from strategy_harness import (
    build,
    load_result,
    merge_rank_dirs,
    probe_batch,
    probe_logits,
    rank_micro_batches,
    save_result,
    spawn,
    tiny_config,
    train_steps,
)


def fsdp_config(*extra: str):
    return tiny_config("fsdp", "train.ema_decay=0.9", *extra)


def test_precision_policy_computes_low_and_reduces_in_fp32():
    bf16 = mixed_precision_policy("bf16")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    assert mixed_precision_policy("fp16").param_dtype == torch.float16
    fp32 = mixed_precision_policy("fp32")
    assert fp32.param_dtype is None and fp32.reduce_dtype is None
    with pytest.raises(ValueError, match="precision.dtype"):
        mixed_precision_policy("int4")


# ---------------------------------------------------------------------------------------------- sharding


def run_sharding(rank: int, world_size: int, out_dir) -> None:
    from raytrainer.model import Transformer

    cfg = fsdp_config()
    strategy, engine = build(cfg, rank, world_size)
    params = dict(strategy.module.named_parameters())
    sharded = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in params.values()
                  if p.numel() >= world_size)
    optimizer_params = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    micro = rank_micro_batches(cfg, 0, rank, world_size)
    grads_inside_no_sync = []
    normalizer = 1.0
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        if last:
            out = strategy.model(**mb, loss_normalizer=normalizer)
            strategy.backward(out.loss)
        else:
            with strategy.no_sync():
                out = strategy.model(**mb, loss_normalizer=normalizer)
                strategy.backward(out.loss)
            grads_inside_no_sync.append(sum(p.grad is not None for p in params.values()))
    grads = {n: p.grad.full_tensor() for n, p in params.items()}  # no_sync's exit turned reduction back on

    # meta-device construction: materialised shard by shard, finite, and no two ranks' shards alike
    with torch.device("meta"):
        meta_model = Transformer(cfg.model)
    meta_strategy, _ = build(cfg, rank, world_size, model=meta_model)
    q = meta_strategy.module.layers[0].self_attn.q_proj.weight
    save_result(out_dir, "sharding", rank, {
        "sharded": sharded, "optimizer_has_dtensors": optimizer_params == {id(p) for p in params.values()},
        "grads_inside_no_sync": grads_inside_no_sync, "grads": grads,
        "meta_local": q.to_local().detach().clone(), "meta_full_std": float(q.full_tensor().std()),
        "meta_norms": [float(p.full_tensor().float().sum()) for n, p in meta_strategy.module.named_parameters()
                       if n.endswith("layernorm.weight")],
        "meta_numel": q.numel(),
    })


@pytest.mark.slow
def test_parameters_are_sharded_and_gradients_reduced_only_on_the_last_micro_step(tmp_path):
    spawn(run_sharding, 2, tmp_path)
    ranks = [load_result(tmp_path, "sharding", rank) for rank in range(2)]
    cfg = fsdp_config()
    for r in ranks:
        assert r["sharded"] and r["optimizer_has_dtensors"]
        assert r["grads_inside_no_sync"] and all(n == 0 for n in r["grads_inside_no_sync"])
    # after the last micro-step both ranks hold the same, complete, averaged gradient: that of one process
    # running the whole batch (normaliser 1 per rank = the sum over the rank's tokens; mean over 2 ranks)
    from raytrainer.model import Transformer

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    for rank in range(2):
        for mb in rank_micro_batches(cfg, 0, rank, 2):
            (model(**mb, loss_normalizer=2.0).loss).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=1e-5, atol=1e-7)
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])

    assert not torch.equal(ranks[0]["meta_local"], ranks[1]["meta_local"])
    assert all(torch.isfinite(r["meta_local"]).all() for r in ranks)
    assert ranks[0]["meta_full_std"] == pytest.approx(cfg.model.init_std, rel=0.1)
    assert ranks[0]["meta_norms"] == [float(cfg.model.d_model)] * 2 * cfg.model.n_layers


# ---------------------------------------------------------------------------------------------- checkpoints


def run_phase(rank: int, world_size: int, out_dir, phase: str) -> None:
    cfg = fsdp_config()
    strategy, engine = build(cfg, rank, world_size)
    if phase == "two":  # train on 2 ranks, save (each rank into its own directory)
        train_steps(engine, cfg, [0, 1, 2], rank, world_size)
        engine.save_checkpoint(out_dir / "two" / f"rank{rank}")
    else:
        saved_by = {"one": ("two", 2), "two-again": ("one", 1)}[phase]
        source, saved_world_size = saved_by
        merged = merge_rank_dirs(sorted((out_dir / source).iterdir()), out_dir / f"merged-{phase}-{rank}")
        engine.load_checkpoint(merged, saved_world_size=saved_world_size)
        if phase == "one":
            engine.save_checkpoint(out_dir / "one" / f"rank{rank}")
    logits = probe_logits(strategy, cfg)
    ema = {n: (t.full_tensor() if isinstance(t, DTensor) else t).clone() for n, t in engine.ema.state_dict().items()}
    continued = train_steps(engine, cfg, [3, 4], rank, world_size)
    save_result(out_dir, phase, rank, {"logits": logits, "ema": ema, "continued": continued})


@pytest.mark.slow
def test_dcp_checkpoint_reshards_two_to_one_and_back_with_identical_outputs(tmp_path):
    spawn(run_phase, 2, tmp_path, "two")
    spawn(run_phase, 1, tmp_path, "one")
    spawn(run_phase, 2, tmp_path, "two-again")
    two, one, again = (load_result(tmp_path, phase) for phase in ("two", "one", "two-again"))

    # the export path reads the same checkpoint in this process, without a process group
    from raytrainer.model import Transformer
    from raytrainer.train.strategies import load_full_state_dict

    cfg = fsdp_config()
    merged = merge_rank_dirs(sorted((tmp_path / "two").iterdir()), tmp_path / "merged-export")
    model = Transformer(cfg.model)
    model.load_state_dict(load_full_state_dict(cfg, model, merged))
    with torch.no_grad():
        assert torch.equal(model(probe_batch(cfg)).logits, two["logits"])
    model.load_state_dict(load_full_state_dict(cfg, model, merged, use_ema=True))
    for name, p in model.named_parameters():
        assert torch.equal(p, two["ema"][name])
    assert torch.equal(model.lm_head.weight, two["ema"]["embed_tokens.weight"])  # tied, and consistent
    assert torch.equal(one["logits"], two["logits"])
    assert torch.equal(again["logits"], two["logits"])
    for name, value in two["ema"].items():
        assert torch.equal(one["ema"][name], value) and torch.equal(again["ema"][name], value)
    # the optimizer state resharded too: training continues along the same curve on 1 and on 2 ranks
    for curve in (one["continued"], again["continued"]):
        for (loss, norm), (loss_ref, norm_ref) in zip(curve, two["continued"], strict=True):
            assert loss == pytest.approx(loss_ref, rel=1e-5)
            assert norm == pytest.approx(norm_ref, rel=1e-4)


def run_staged_save(rank: int, world_size: int, out_dir, phase: str) -> None:
    import threading

    cfg = fsdp_config()
    strategy, engine = build(cfg, rank, world_size)
    if phase == "stage":
        train_steps(engine, cfg, [0, 1, 2], rank, world_size)
        logits = probe_logits(strategy, cfg)
        write = engine.stage_checkpoint(out_dir / "staged" / f"rank{rank}")
        writer = threading.Thread(target=write)
        writer.start()  # the write's collectives run beside the training step's, on a group of their own
        train_steps(engine, cfg, [3, 4], rank, world_size)
        writer.join()
        save_result(out_dir, phase, rank, {"logits": logits, "after": probe_logits(strategy, cfg)})
    else:
        merged = merge_rank_dirs(sorted((out_dir / "staged").iterdir()), out_dir / f"merged-staged-{rank}")
        engine.load_checkpoint(merged, saved_world_size=2)
        save_result(out_dir, phase, rank, {"logits": probe_logits(strategy, cfg)})


@pytest.mark.slow
def test_a_staged_save_holds_the_state_of_when_it_was_staged_while_training_goes_on(tmp_path):
    spawn(run_staged_save, 2, tmp_path, "stage")
    spawn(run_staged_save, 1, tmp_path, "load")
    staged, loaded = load_result(tmp_path, "stage"), load_result(tmp_path, "load")
    assert not torch.equal(staged["after"], staged["logits"])  # training moved on while it was written
    assert torch.equal(loaded["logits"], staged["logits"])

"""DeepSpeed ZeRO behind the Strategy interface: the guardian's skipped update changes nothing, the pre-step
norm is DeepSpeed's own, and checkpoints saved on 2 ranks reload on 2 (in place, a rollback) and on 1
through a universal checkpoint with identical outputs, reading every file weights-only."""

from __future__ import annotations

import pytest
import torch

from raytrainer.train.deepspeed_strategy import deepspeed_config
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


def zero_config(stage: int, *extra: str):
    return tiny_config("deepspeed", f"parallel.zero_stage={stage}", *extra)


def local_state(strategy) -> dict[str, torch.Tensor]:
    """This rank's share of everything an update touches: fp32 master weights, AdamW state, model weights."""
    opt = strategy.optimizer
    out = {}
    for i, state in enumerate(opt.optimizer.state.values()):
        for key, value in state.items():
            out[f"adam{i}.{key}"] = torch.as_tensor(value).detach().clone()
    masters = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
    for i, master in enumerate(masters):
        out[f"master{i}"] = master.detach().clone()
    for name, p in strategy.module.named_parameters():
        out[name] = getattr(p, "ds_tensor", p).detach().clone()  # ZeRO-3: this rank's partition
    return out


# ---------------------------------------------------------------------------------------------- skip


def run_skip(rank: int, world_size: int, out_dir, variants: list[tuple]) -> None:
    for overrides in variants:
        save_result(out_dir, "skip-" + "-".join(map(str, overrides)), rank, skip_once(rank, world_size, overrides))


def skip_once(rank: int, world_size: int, overrides: tuple) -> dict:
    cfg = zero_config(*overrides)
    strategy, engine = build(cfg, rank, world_size)
    train_steps(engine, cfg, [0, 1], rank, world_size)
    stats = engine.forward_backward(rank_micro_batches(cfg, 2, rank, world_size), 2)
    before = local_state(strategy)
    skipped_before, steps_before = strategy.engine.skipped_steps, strategy.engine.global_steps
    applied = engine.apply(skip=True)
    after = local_state(strategy)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    counters = [strategy.engine.skipped_steps - skipped_before, strategy.engine.global_steps - steps_before]

    # gradients that overflow (NaN) are reported as a non-finite norm and discarded the same way
    for mb in rank_micro_batches(cfg, 2, rank, world_size):
        strategy.backward(strategy.model(**mb, loss_normalizer=1.0).loss * float("nan"))
    nan_norm = strategy.clip_grad_norm(cfg.optim.grad_clip)
    engine.zero_grad()
    changed += [f"after NaN: {k}" for k, v in local_state(strategy).items() if not torch.equal(v, before[k])]

    curve = train_steps(engine, cfg, [3, 4], rank, world_size)
    deepspeed_norm = float(strategy.engine.get_global_grad_norm())  # the norm DeepSpeed clipped step 4 with
    final = local_state(strategy)

    # the same run in which batch 2 never existed
    strategy, engine = build(cfg, rank, world_size)
    reference_curve = train_steps(engine, cfg, [0, 1, 3, 4], rank, world_size)[2:]
    reference = local_state(strategy)
    return {
        "applied": applied, "grad_norm": stats.grad_norm, "changed": changed, "counters": counters,
        "nan_norm": nan_norm, "curve": curve, "reference_curve": reference_curve,
        "deepspeed_norm": deepspeed_norm, "same_keys": sorted(final) == sorted(reference),
        "final_diff": max((final[k] - reference[k]).abs().max().item() for k in reference),
    }


SKIP_VARIANTS = {
    "zero1-zero2": [(1,), (2,)],
    "zero3-and-offload": [(3,), (3, "parallel.offload_optimizer=true", "parallel.offload_params=true")],
}


@pytest.mark.slow
@pytest.mark.parametrize("group", list(SKIP_VARIANTS))
def test_skipped_update_changes_nothing_and_the_next_step_is_normal(group, tmp_path):
    spawn(run_skip, 2, tmp_path, SKIP_VARIANTS[group])
    for overrides in SKIP_VARIANTS[group]:
        for rank in range(2):
            r = load_result(tmp_path, "skip-" + "-".join(map(str, overrides)), rank)
            where = f"{overrides} rank {rank}"
            assert r["applied"] is False
            assert r["grad_norm"] > 0
            assert r["changed"] == [], f"{where}: a discarded update changed {r['changed']}"
            assert r["counters"] == [1, 1], where  # DeepSpeed counts a skipped step, as for an fp16 overflow
            assert r["nan_norm"] == float("inf"), where
            # nothing of batch 2 leaks into later steps: the run goes on exactly as if it had never seen it
            assert r["same_keys"] and r["final_diff"] == 0.0, where
            assert r["curve"] == r["reference_curve"], where
            # the norm reported before the step is the one DeepSpeed itself computed for clipping
            assert r["curve"][-1][1] == pytest.approx(r["deepspeed_norm"], rel=1e-6), where


# ---------------------------------------------------------------------------------------------- checkpoints


def run_save(rank: int, world_size: int, out_dir, stage: int, extra: tuple) -> None:
    cfg = zero_config(stage, *extra)
    strategy, engine = build(cfg, rank, world_size)
    train_steps(engine, cfg, [0, 1, 2], rank, world_size)
    engine.save_checkpoint(out_dir / f"rank{rank}")  # each rank its own local directory
    saved = probe_logits(strategy, cfg)
    ema = {k: v.clone() for k, v in engine.ema.state_dict().items()} if engine.ema else {}
    continued = train_steps(engine, cfg, [3, 4], rank, world_size)

    # roll back in place: the live engine loads the checkpoint it wrote (after the store merged the ranks)
    merged = merge_rank_dirs([out_dir / "rank0", out_dir / "rank1"], out_dir / f"merged-live-{rank}")
    engine.load_checkpoint(merged, saved_world_size=2)
    reloaded = probe_logits(strategy, cfg)
    again = train_steps(engine, cfg, [3, 4], rank, world_size)
    save_result(out_dir, "save", rank, {"logits": saved, "continued": continued, "ema": ema,
                                        "reloaded": reloaded, "again": again, "after": probe_logits(strategy, cfg)})


def run_load_on_one(rank: int, world_size: int, out_dir, stage: int, extra: tuple) -> None:
    from raytrainer.model import Transformer
    from raytrainer.train.strategies import load_full_state_dict

    cfg = zero_config(stage, *extra)
    merged = merge_rank_dirs([out_dir / "rank0", out_dir / "rank1"], out_dir / "merged")
    strategy, engine = build(cfg, rank, world_size)
    engine.load_checkpoint(merged, saved_world_size=2)
    logits = probe_logits(strategy, cfg)
    ema = {k: v.clone() for k, v in engine.ema.state_dict().items()} if engine.ema else {}
    continued = train_steps(engine, cfg, [3, 4], rank, world_size)

    # the export path: fp32 weights (or their EMA) from the checkpoint files alone, no DeepSpeed engine
    model = Transformer(cfg.model)
    model.load_state_dict(load_full_state_dict(cfg, model, merged))
    with torch.no_grad():
        exported = model(probe_batch(cfg)).logits
    exported_ema = {}
    if engine.ema is not None:
        model.load_state_dict(load_full_state_dict(cfg, model, merged, use_ema=True))
        exported_ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_result(out_dir, "load1", rank, {"logits": logits, "continued": continued, "ema": ema,
                                         "exported": exported, "exported_ema": exported_ema,
                                         "after": probe_logits(strategy, cfg),
                                         "left_behind": sorted(p.name for p in merged.iterdir())})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_checkpoint_reloads_in_place_and_on_one_rank_through_universal(stage, tmp_path):
    extra = ("train.ema_decay=0.9",) if stage < 3 else ()  # EMA needs whole parameters (not ZeRO-3)
    spawn(run_save, 2, tmp_path, stage, extra)
    saved = [load_result(tmp_path, "save", rank) for rank in range(2)]
    for s in saved:  # same world size, into the live engine: identical outputs, identical continuation
        assert torch.equal(s["reloaded"], s["logits"])
        assert s["again"] == s["continued"]
        assert torch.equal(s["after"], saved[0]["after"])

    spawn(run_load_on_one, 1, tmp_path, stage, extra)
    one = load_result(tmp_path, "load1")
    ref = saved[0]
    assert torch.equal(one["logits"], ref["logits"]), "weights differ after the universal load"
    torch.testing.assert_close(one["exported"], ref["logits"], rtol=0, atol=1e-6)
    for name, value in ref["ema"].items():
        assert torch.equal(one["ema"][name], value)
        assert torch.equal(one["exported_ema"][name], value)
    assert bool(ref["ema"]) == (stage < 3)
    # optimizer state came along (AdamW moments, step count, per-group weight decay): the next steps
    # match the 2-rank run up to the order of floating-point sums
    for (loss1, norm1), (loss2, norm2) in zip(one["continued"], ref["continued"], strict=True):
        assert loss1 == pytest.approx(loss2, rel=1e-5)
        assert norm1 == pytest.approx(norm2, rel=1e-4)
    torch.testing.assert_close(one["after"], ref["after"], rtol=1e-4, atol=1e-5)
    assert not [n for n in one["left_behind"] if n.startswith(".universal")]  # the conversion is cleaned up


# ---------------------------------------------------------------------------------------------- config


def test_config_maps_precision_offload_and_clipping():
    cfg = zero_config(3, "precision.dtype=fp16", "parallel.offload_optimizer=true", "parallel.offload_params=true",
                      "precision.initial_loss_scale=1024", "optim.grad_clip=null")
    ds = deepspeed_config(cfg, torch.device("cpu"))
    assert ds["managed_gradient_accumulation"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and ds["fp16"]["initial_scale_power"] == 10
    assert "bf16" not in ds
    assert ds["gradient_clipping"] == 0.0
    bf16 = deepspeed_config(zero_config(1, "precision.dtype=bf16"), torch.device("cpu"))
    assert bf16["bf16"] == {"enabled": True} and "offload_optimizer" not in bf16["zero_optimization"]
    assert bf16["gradient_clipping"] == 0.5


@pytest.mark.parametrize("overrides, message", [
    (("precision.dtype=fp8",), "fp8"),
    (("train.ema_decay=0.99",), "ZeRO-3"),
    (("optim.name=adafactor",), "adamw"),
])
def test_config_refuses_what_deepspeed_cannot_do(overrides, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_config(zero_config(3, *overrides), torch.device("cpu"))

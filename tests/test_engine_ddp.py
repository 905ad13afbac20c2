"""DDP on 2 gloo processes: the same loss, gradients and update as one process on the same global batch
(an uneven split, one rank padded with an all-ignored micro-batch); its DCP checkpoint, saved on 2 ranks,
loads in one process without a process group, with identical outputs, optimizer state and EMA."""

from __future__ import annotations

import pytest
import torch
from test_engine import build, grads, make_batch, padding_micro_batch, params, split_rows, tiny_config

from raytrainer.model import Transformer
from raytrainer.train.engine import StepEngine
from raytrainer.train.strategy import DDPStrategy
from strategy_harness import load_result, merge_rank_dirs, save_result, spawn

OVERRIDES = ("train.ema_decay=0.5", "optim.grad_clip=1.0")
ROWS = 5  # rank 0 takes rows 0-2 as micro-batches of 2 and 1; rank 1 rows 3-4 and a padding micro-batch


def micro_batches(batch: dict, rank: int) -> list[dict]:
    return split_rows(batch, [2, 1]) if rank == 0 else [*split_rows({k: v[3:] for k, v in batch.items()}, [2]),
                                                        padding_micro_batch(batch)]


def probe(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(x).logits


def ddp_job(rank: int, world_size: int, out_dir, _unused=None) -> None:
    cfg = tiny_config(*OVERRIDES)
    torch.manual_seed(0)
    strategy = DDPStrategy(cfg, Transformer(cfg.model), rank, world_size)
    assert isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel)
    engine = StepEngine(strategy.model, cfg, strategy)
    stats = engine.forward_backward(micro_batches(make_batch(cfg, ROWS, seed=1), rank), step=0)
    first = {"loss": stats.loss, "grad_norm": stats.grad_norm, "label_tokens": stats.label_tokens,
             "grads": grads(strategy)}
    engine.apply()
    engine.train_step(micro_batches(make_batch(cfg, ROWS, seed=2), rank), step=1)
    engine.save_checkpoint(out_dir / "ddp" / f"rank{rank}")
    save_result(out_dir, "ddp", rank, {**first, "params": params(strategy), "probe": probe(strategy.module),
                                       "optim": optimizer_state(strategy.optimizer),
                                       "ema": {n: t.clone() for n, t in engine.ema.shadow.items()}})


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    return {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(ddp_job, 2, out)
    return out, [load_result(out, "ddp", rank) for rank in range(2)]


def single_process_run():
    cfg = tiny_config(*OVERRIDES)
    strategy, engine = build(cfg)
    stats = engine.forward_backward(split_rows(make_batch(cfg, ROWS, seed=1), [3, 2]), step=0)
    first = {"loss": stats.loss, "grad_norm": stats.grad_norm, "label_tokens": stats.label_tokens,
             "grads": grads(strategy)}
    engine.apply()
    engine.train_step([make_batch(cfg, ROWS, seed=2)], step=1)
    return first, strategy, engine


def test_ddp_gives_the_single_process_loss_gradients_and_update(two_ranks):
    _, ranks = two_ranks
    first, strategy, _ = single_process_run()
    for r in ranks:
        assert r["loss"] == pytest.approx(first["loss"], rel=1e-6)
        assert r["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-5)
        assert r["label_tokens"] == first["label_tokens"]
        for name, g in first["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
        for name, p in params(strategy).items():
            torch.testing.assert_close(r["params"][name], p, rtol=1e-5, atol=2e-5, msg=name)  # Adam: lr * g/|g|
    assert all(torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in ranks[0]["params"])


def test_dcp_checkpoint_from_two_ranks_loads_in_one_process_with_identical_outputs(two_ranks):
    import torch.distributed as dist

    out, ranks = two_ranks
    assert not dist.is_initialized()  # this process loads on its own
    merged = merge_rank_dirs([out / "ddp" / "rank0", out / "ddp" / "rank1"], out / "merged")
    cfg = tiny_config(*OVERRIDES)
    strategy, engine = build(cfg, seed=99)  # different initial weights: everything must come from the files
    engine.load_checkpoint(merged, saved_world_size=2)
    assert torch.equal(probe(strategy.module), ranks[0]["probe"])
    assert all(torch.equal(p, ranks[0]["params"][n]) for n, p in params(strategy).items())

    saved, loaded = ranks[0]["optim"], optimizer_state(strategy.optimizer)
    assert loaded.keys() == saved.keys() and len(saved) == len(list(strategy.module.parameters()))
    for i, state in saved.items():
        assert float(state["step"]) == 2.0
        for key, value in state.items():
            assert torch.equal(loaded[i][key], value), (i, key)
    assert [g["lr_scale"] for g in strategy.optimizer.param_groups] == [1.0] * len(strategy.optimizer.param_groups)
    assert [g["weight_decay"] for g in strategy.optimizer.param_groups] == [0.1, 0.1, 0.0, 0.0]
    for name, t in ranks[0]["ema"].items():
        assert torch.equal(engine.ema.shadow[name], t), name

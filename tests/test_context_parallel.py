"""Context parallel (parallel.cp) on gloo ranks: every row's sequence split in zigzag chunks, attention over the
gathered keys and values; the same losses, gradients and evaluations as one process, alone (cp=2) and with data
parallel (dp2 x cp2)."""

from __future__ import annotations

import pytest
import torch

from raytrainer.config import ConfigError
from raytrainer.train.context_parallel import shard_sequence, zigzag_positions
from strategy_harness import (
    assert_follows_the_reference,
    assert_same_gradients,
    curve_run,
    load_result,
    rank_micro_batches,
    save_result,
    single_process_curve,
    spawn,
    tiny_config,
)

STEPS = range(4)  # steps 2 and 3: rows of 16 tokens, twice as many


def cp_config(cp: int, workers: int):
    return tiny_config("ddp", f"parallel.cp={cp}", f"parallel.min_workers={workers}",
                       f"parallel.max_workers={workers}")


def test_zigzag_chunks_cover_a_row_and_balance_causal_work():
    T, cp = 16, 4
    shares = [zigzag_positions(T, cp, r) for r in range(cp)]
    assert shares[0].tolist() == [0, 1, 14, 15] and shares[3].tolist() == [6, 7, 8, 9]
    assert sorted(torch.cat(shares).tolist()) == list(range(T))
    # a query at position i attends to i + 1 keys: every rank does the same work (contiguous slices: 10 vs 58)
    assert {int((share + 1).sum()) for share in shares} == {34}


def test_a_micro_batch_is_shared_out_with_its_positions_and_documents():
    batch = {"input_ids": torch.arange(8).expand(2, 8), "labels": torch.arange(1, 9).expand(2, 8),
             "doc_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)}
    mine = shard_sequence(batch, 1, 2)  # chunks 1 and 2 of four
    assert mine["input_ids"][0].tolist() == [2, 3, 4, 5]
    assert mine["labels"][0].tolist() == [3, 4, 5, 6]
    assert mine["position_ids"][0].tolist() == [2, 3, 4, 5]  # where they sit in the whole row
    assert mine["doc_ids"][0].tolist() == [0, 1, 1, 1]


@pytest.mark.parametrize("overrides,message", [
    (["parallel.cp=2", "parallel.max_workers=3"], r"parallel.max_workers=3 is not a multiple of parallel.cp=2"),
    (["parallel.cp=3", "parallel.min_workers=3", "parallel.max_workers=3"],
     r"sequence length 16 does not split into 2 x parallel.cp=3 equal chunks"),
    (["parallel.cp=2", "parallel.max_workers=2", "parallel.strategy=fsdp"],
     r"parallel.strategy=fsdp with parallel.cp=2 is not supported"),
    (["parallel.cp=2", "parallel.max_workers=2", "model.mtp_heads=1"], r"model.mtp_heads with parallel.cp=2"),
])
def test_context_parallel_settings_are_checked_with_named_errors(overrides, message):
    base = [] if any(o.startswith("parallel.min_workers") for o in overrides) else ["parallel.min_workers=2"]
    with pytest.raises(ConfigError, match=message):
        tiny_config("ddp", *base, *overrides)


def token_losses(engine, cfg, rank: int) -> torch.Tensor:
    dims = engine.strategy.dims
    stats = engine.forward_backward(rank_micro_batches(cfg, 7, dims.dp_rank(rank), dims.dp), 7, token_losses=True)
    engine.zero_grad()
    return torch.cat(stats.token_ce)


def run_curve(rank: int, world_size: int, out_dir, cp: int) -> None:
    cfg = cp_config(cp, world_size)
    run, engine = curve_run(cfg, rank, world_size, STEPS, token_losses=True)
    save_result(out_dir, "run", rank, {**run, "token_ce": token_losses(engine, cfg, rank)})


@pytest.fixture(scope="module")
def reference() -> dict:
    cfg = tiny_config("ddp")
    run, engine = single_process_curve(cfg, STEPS, token_losses=True)
    return {**run, "token_ce": token_losses(engine, cfg, 0)}


@pytest.mark.slow
@pytest.mark.parametrize("world_size,cp", [(2, 2), (4, 2)], ids=["cp2", "dp2xcp2"])
def test_context_parallel_follows_the_single_process_curve(world_size, cp, reference, tmp_path):
    spawn(run_curve, world_size, tmp_path, cp)
    runs = [load_result(tmp_path, "run", rank) for rank in range(world_size)]
    assert_follows_the_reference(runs, reference)
    assert_same_gradients(runs[0]["grads"], reference["grads"])  # data parallel over every rank: alike everywhere
    # every token's loss, whole rows again on the replica's first rank (what per-document blame reads)
    dp = world_size // cp
    mine = torch.cat([runs[r * cp]["token_ce"] for r in range(dp)])[:len(reference["token_ce"])]
    # (after four updates the weights differ by fp32 rounding, which moves a token's loss by ~1e-5 relative on
    # some CPUs; rows put back in the wrong order would be off by whole nats)
    torch.testing.assert_close(mine, reference["token_ce"], rtol=1e-4, atol=1e-5)

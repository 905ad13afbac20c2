"""The mesh's arithmetic and the config's checks of tensor parallelism, before any process starts."""

from __future__ import annotations

import pytest

from raytrainer.config import ConfigError, load_config
from raytrainer.train.mesh import ParallelDims

TINY = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.multiple_of=32", "model.max_seq_len=32", "train.seq_len=32", "train.global_batch_tokens=256",
        "parallel.strategy=fsdp"]


def test_ranks_of_a_tensor_parallel_group_are_consecutive_and_share_a_replica():
    dims = ParallelDims(6, tp=2)
    assert dims.dp == 3
    assert [dims.dp_rank(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [dims.tp_rank(r) for r in range(6)] == [0, 1, 0, 1, 0, 1]
    assert ParallelDims(3).dp == 3 and ParallelDims(3).dp_rank(2) == 2


def test_a_world_that_does_not_divide_into_groups_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"5 ranks .* parallel.tp=2"):
        ParallelDims(5, tp=2)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tp=2", "parallel.min_workers=2", "parallel.max_workers=3"],
     r"parallel.max_workers=3 is not a multiple of parallel.tp=2"),
    (["parallel.tp=2", "parallel.min_workers=1", "parallel.max_workers=2"],
     r"parallel.min_workers=1 is not a multiple of parallel.tp=2"),
    (["parallel.tp=2", "parallel.strategy=ddp", "parallel.min_workers=2", "parallel.max_workers=2"],
     r"parallel.tp=2 needs parallel.strategy=fsdp \(now ddp\)"),
    (["parallel.tp=4", "parallel.min_workers=4", "parallel.max_workers=4"],
     r"model.n_kv_heads=2 is not divisible by parallel.tp=4"),
    (["parallel.tp=2", "parallel.min_workers=2", "parallel.max_workers=2", "model.n_heads=2",
      "model.n_kv_heads=1"], r"model.n_kv_heads=1 is not divisible by parallel.tp=2"),
    (["parallel.tp=2", "parallel.min_workers=2", "parallel.max_workers=2", "model.mtp_heads=1"],
     r"model.mtp_heads with parallel.tp=2 is not supported"),
    (["parallel.tp=2", "parallel.min_workers=2", "parallel.max_workers=2", "model.loss.chunk_tokens=64"],
     r"model.loss.chunk_tokens with parallel.tp=2"),
    # 256 tokens of 32: 8 rows; 32 workers in groups of 2 would be 16 replicas
    (["parallel.tp=2", "parallel.min_workers=2", "parallel.max_workers=32"],
     r"global batch of 8 rows .* parallel.max_workers=32 / parallel.tp=2"),
])
def test_tensor_parallel_settings_are_checked_with_named_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


def test_tensor_parallel_replicas_need_rows_not_workers():
    cfg = load_config(None, [*TINY, "parallel.tp=2", "parallel.min_workers=2", "parallel.max_workers=16"])
    assert cfg.parallel.max_replicas == 8  # 8 rows for 16 workers is enough: each pair shares its rows


def test_an_elastic_tensor_parallel_run_is_sized_in_whole_groups(monkeypatch):
    from ray.train import ScalingConfig

    from raytrainer import elastic

    monkeypatch.setattr(elastic, "live_nodes", lambda ids, timeout_s=1.0: set(ids))
    monkeypatch.setattr(elastic, "draining_nodes", lambda: set())
    policy = elastic.NodeLossAwareElasticPolicy(
        ScalingConfig(num_workers=(2, 8), resources_per_worker={"CPU": 1}), 600, 30, workers_per_replica=2)
    three_slots, four_slots = {"CPU": 3.0}, {"CPU": 4.0}
    assert policy._count_possible_workers({"a": three_slots, "b": four_slots}) == 6  # 7 places: 3 groups of 2
    assert policy._count_possible_workers({"a": three_slots}) == 2


@pytest.mark.parametrize("overrides,message", [
    (["parallel.ep=2", "parallel.strategy=ddp", "parallel.min_workers=2", "parallel.max_workers=2"],
     r"parallel.ep=2 splits the experts of a mixture-of-experts model; set model.moe"),
    (["parallel.ep=4", "parallel.strategy=ddp", "parallel.min_workers=4", "parallel.max_workers=4",
      "model.moe={n_experts: 6}"], r"model.moe.n_experts=6 is not divisible by parallel.ep=4"),
    (["parallel.ep=2", "parallel.min_workers=2", "parallel.max_workers=2", "model.moe={n_experts: 4}"],
     r"parallel.ep=2 works with parallel.strategy=ddp and parallel.tp=1 for now \(now fsdp, tp=1\)"),
    (["parallel.ep=2", "parallel.strategy=ddp", "parallel.max_workers=3", "model.moe={n_experts: 4}"],
     r"parallel.min_workers=1 is not a multiple of parallel.ep=2"),
])
def test_expert_parallel_settings_are_checked_with_named_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])

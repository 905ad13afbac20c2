"""DeepSpeed through the whole training loop and checkpoint store: a run on 2 ranks, resumed from its
mid-run checkpoint on 1 rank (the store merges each rank's own files; the load converts them to a universal
checkpoint), continues along the loss curve the 2-rank run itself took from there. (FSDP's DCP files take
the same path through the store as DDP's; tests/test_fsdp.py covers their resharding.)"""

from __future__ import annotations

import shutil

import pytest
import torch

from raytrainer.fault.checkpoint_store import CheckpointStore
from runs import make_dataset, micro_config
from strategy_harness import load_result, save_result, spawn


def run_loop(rank: int, world_size: int, out_dir, dataset, storage: str, extra: tuple, tag: str):
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import broadcast_from_rank0, build_trainer

    cfg = micro_config(dataset, storage, name="elastic", steps=6,
                       extra=["parallel.max_workers=2", "guardian.enabled=false", "checkpoint.every_steps=3",
                              *extra])
    env = WorkerEnv(rank=rank, world_size=world_size, broadcast=broadcast_from_rank0)
    trainer = build_trainer(cfg, env, torch.device("cpu"))
    trainer.checkpoints.staging = out_dir / f"staging-{tag}-{rank}"  # ranks stage apart, as on two hosts
    history = trainer.fit()["history"]
    save_result(out_dir, tag, rank, {h["step"]: h["loss"] for h in history if h.get("applied")})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("strategy-loop-data"))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("parallel.strategy=deepspeed", "parallel.zero_stage=2")], ids=["zero2"])
def test_two_rank_run_resumes_on_one_rank_along_the_same_curve(extra, dataset, tmp_path):
    two = tmp_path / "two"
    spawn(run_loop, 2, tmp_path, dataset, str(two), extra, "two")
    one = tmp_path / "one"
    shutil.copytree(two, one)
    store = CheckpointStore(str(one), "elastic")
    assert store.steps() == [3, 6]
    store.delete(6)  # as if the 2-rank run had died after its step-3 checkpoint
    spawn(run_loop, 1, tmp_path, dataset, str(one), extra, "one")

    on_two, on_one = load_result(tmp_path, "two"), load_result(tmp_path, "one")
    assert sorted(on_two) == list(range(6))
    assert sorted(on_one) == [3, 4, 5]  # resumed from the step-3 checkpoint written by 2 ranks
    for step in on_one:
        assert on_one[step] == pytest.approx(on_two[step], rel=1e-5), step
    assert store.latest_complete() == 6

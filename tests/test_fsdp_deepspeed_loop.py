"""FSDP, DeepSpeed and pipeline parallel through the whole training loop and checkpoint store.

- A DeepSpeed run on 2 ranks, resumed from its mid-run checkpoint on 1 rank (the store merges each rank's
  own files; the load converts them to a universal checkpoint), continues along the loss curve the 2-rank
  run itself took from there; so does a 2-stage pipeline's run, resumed without a pipeline. (FSDP's DCP files
  take the same path through the store as DDP's; tests/test_fsdp.py covers their resharding.)
- The guardian with each sharded strategy, and with a 2-stage pipeline, on 2 ranks: an exploding gradient on
  one rank is skipped on every rank, a second one rolls every rank back in place to the last healthy
  checkpoint, and the replayed step reproduces the loss it had the first time (the sharded model and optimizer
  really went back)."""

from __future__ import annotations

import math
import shutil
import time

import pytest
import torch

from raytrainer.checkpoint import CheckpointStore
from runs import make_dataset, micro_config
from strategy_harness import load_result, save_result, spawn

PIPELINE = ("parallel.pp=2", "parallel.min_workers=2", "model.tie_embeddings=false")


def run_loop(rank: int, world_size: int, out_dir, dataset, storage: str, extra: tuple, tag: str):
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import broadcast_from_rank0, build_trainer

    if world_size == 1:  # the same model without a pipeline
        extra = tuple(e for e in extra if not e.startswith(("parallel.pp", "parallel.min_workers")))
    cfg = micro_config(dataset, storage, name="elastic", steps=6,
                       extra=["parallel.max_workers=2", "guardian.enabled=false", "checkpoint.every_steps=3",
                              *extra])
    env = WorkerEnv(rank=rank, world_size=world_size, broadcast=broadcast_from_rank0)
    trainer = build_trainer(cfg, env, torch.device("cpu"))
    trainer.checkpoints.staging = out_dir / f"staging-{tag}-{rank}"  # ranks stage apart, as on two hosts
    history = trainer.fit()["history"]
    save_result(out_dir, tag, rank, {h["step"]: h["loss"] for h in history if h.get("applied")})


def run_guarded(rank: int, world_size: int, out_dir, dataset, storage: str, extra: tuple, tag: str,
                rank1_upload_delay_s: float = 0.0):
    from raytrainer.fault.events import EventLog, RunStore
    from raytrainer.fault.guardian import Guardian
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import broadcast_from_rank0, build_trainer

    cfg = micro_config(dataset, storage, name="guarded", steps=12, extra=[
        "parallel.max_workers=2", "checkpoint.every_steps=4", "guardian.warmup_exempt_steps=2",
        "guardian.skips_before_rollback=1", "guardian.rollback_skip_batches=1",
        "faults=[{step: 5, kind: grad_explode, rank: 1}, {step: 9, kind: grad_explode, rank: 0}]", *extra])
    env = WorkerEnv(rank=rank, world_size=world_size, broadcast=broadcast_from_rank0)
    events = EventLog(RunStore.for_run(cfg)) if rank == 0 else None
    guardian = Guardian(cfg.guardian, cfg.run.name, on_event=events.append if events else None)
    trainer = build_trainer(cfg, env, torch.device("cpu"), guardian=guardian)
    trainer.checkpoints.staging = out_dir / f"staging-{tag}-{rank}"
    if rank == 1 and rank1_upload_delay_s:  # a slow rank: its part of each checkpoint commits seconds late
        writer = trainer.checkpoints.store.writer
        save = writer._save

        def slow_save(*job):
            time.sleep(rank1_upload_delay_s)
            return save(*job)

        writer._save = slow_save
    history = trainer.fit()["history"]
    if events is not None:
        events.close()
    save_result(out_dir, tag, rank, history)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("strategy-loop-data"))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("parallel.strategy=deepspeed", "parallel.zero_stage=2"), PIPELINE],
                         ids=["zero2", "pp2"])
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


@pytest.mark.slow
@pytest.mark.parametrize("extra,upload_delay_s", [
    (("parallel.strategy=fsdp",), 0.0),
    (("parallel.strategy=deepspeed", "parallel.zero_stage=2"), 0.0),
    # the loss is computed on the last stage: both explosions there
    ((*PIPELINE, "faults=[{step: 5, kind: grad_explode, rank: 1}, {step: 9, kind: grad_explode, rank: 1}]"), 0.0),
    # rank 1 commits its part of checkpoint 4 long after step 9: step 5's rerun waits for it, so it is the target
    (("parallel.strategy=fsdp",), 4.0),
    # no rerun: step 5 is judged once the uploads are settled instead
    (("parallel.strategy=fsdp", "guardian.rerun=false"), 4.0),
], ids=["fsdp", "zero2", "pp2", "fsdp-slow-rank-upload", "fsdp-slow-rank-upload-no-rerun"])
def test_guardian_skips_then_rolls_back_every_rank_in_place(extra, upload_delay_s, dataset, tmp_path):
    from raytrainer.fault.events import RunStore, read_events

    storage = tmp_path / "run"
    spawn(run_guarded, 2, tmp_path, dataset, str(storage), extra, "guarded", upload_delay_s)
    histories = [load_result(tmp_path, "guarded", rank) for rank in range(2)]
    decisions = [[(h["step"], h["action"]) for h in hist if h.get("action") != "continue"] for hist in histories]
    assert decisions[0] == decisions[1]  # every rank acted on rank 0's decision
    assert decisions[0] == [(5, "skip"), (9, "rollback")]
    rollback = next(h for h in histories[0] if h.get("action") == "rollback")
    # Steps 5 and 9 form one streak (skips_before_rollback=1): the step-8 checkpoint was written inside it,
    # so the healthy one is step 4; the window runs from the first anomalous batch past the second.
    assert rollback["to"] == 4 and tuple(rollback["skip"]) == (5, 11)
    first, replay = {}, {}
    for h in histories[0]:
        if h.get("applied") is not None:
            (replay if h["step"] in first and h["step"] <= 9 else first).setdefault(h["step"], h["loss"])
    assert replay[4] == pytest.approx(first[4], rel=1e-5)  # same weights, same batch: the state went back
    assert replay[5] != pytest.approx(first[5], rel=1e-3)  # batch 5 was skipped: step 5 now trains on 11
    applied = [h for h in histories[0] if h.get("applied")]
    assert applied[-1]["step"] == 11 and all(math.isfinite(h["loss"]) for h in applied)
    store = CheckpointStore(str(storage), "guarded")
    assert store.latest_complete() == 12
    cursor = store.read_json(12, "trainer_state.json")["cursor"]
    assert any(a <= 5 and 11 <= b for a, b in cursor["skip"])
    cfg = micro_config(dataset, str(storage), name="guarded")
    logged = [(e.get("step"), e.get("event")) for e in read_events(RunStore.for_run(cfg))]
    assert (5, "skip") in logged and (9, "rollback") in logged


@pytest.mark.slow
@pytest.mark.parametrize("rerun", ["true", "false"])
def test_a_rollback_at_the_first_anomaly_reaches_the_checkpoint_a_slow_rank_is_still_uploading(rerun, dataset,
                                                                                                tmp_path):
    """No skip comes first (guardian.skips_before_rollback=0): the step-4 checkpoint, saved just before the
    anomaly, is still being uploaded by rank 1 when step 5 is judged; the rerun (or, without reruns, the
    guardian's settle) waits for it, so the rollback goes there instead of aborting for want of a committed
    checkpoint."""
    extra = ("parallel.strategy=fsdp", "guardian.skips_before_rollback=0", f"guardian.rerun={rerun}",
             # at step 5 the guardian's statistics are not armed yet (a doubled loss is caught once they are:
             # test_detectors, the chaos soak): only a blow-up is an anomaly this early
             "faults=[{step: 5, kind: grad_explode, rank: 1}]")
    spawn(run_guarded, 2, tmp_path, dataset, str(tmp_path / "run"), extra, "first", 4.0)
    histories = [load_result(tmp_path, "first", rank) for rank in range(2)]
    decisions = [[(h["step"], h["action"]) for h in hist if h.get("action") != "continue"] for hist in histories]
    assert decisions[0] == decisions[1] == [(5, "rollback")]
    rollback = next(h for h in histories[0] if h.get("action") == "rollback")
    assert rollback["to"] == 4
    assert [h["step"] for h in histories[0] if h.get("applied")][-1] == 11

"""Preemption: a worker told to stop (SIGTERM, or Ray's drain notice) makes the whole group checkpoint at the end
of the step and end, so the next group starts there: nothing trained before the notice is lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from raytrainer.fault.preemption import Preempted, StopNotice
from raytrainer.train.ray_notice import watch_for_stop
from runs import make_dataset, micro_config
from strategy_harness import load_result, save_result, spawn


def test_a_notice_keeps_its_first_reason_and_polls_its_sources():
    drained: list[str | None] = [None]
    notice = StopNotice(sources=(lambda: drained[0],))
    assert notice.reason() is None
    drained[0] = "Ray is draining node n1 for preemption"
    assert notice.reason() == "Ray is draining node n1 for preemption"
    notice.notify("SIGTERM")
    assert notice.reason() == "Ray is draining node n1 for preemption"


def test_the_first_sigterm_is_a_notice_and_the_second_stops_the_process():
    script = textwrap.dedent("""
        import os, signal, sys, time
        from raytrainer.fault.preemption import StopNotice
        from raytrainer.train.ray_notice import watch_for_stop
        notice = StopNotice()
        watch_for_stop(notice)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("told:", notice.reason(), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still here", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "told: SIGTERM" in done.stdout and "still here" not in done.stdout
    assert done.returncode == -15, done.stderr


def in_process(tmp_path, steps: int, extra: list[str]):
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import build_trainer

    cfg = micro_config(make_dataset(tmp_path), str(tmp_path / "runs"), name="pre", steps=steps, extra=extra)
    notice = StopNotice()
    restore = watch_for_stop(notice)
    try:
        return build_trainer(cfg, WorkerEnv(notice=notice.reason), torch.device("cpu")), restore
    except BaseException:
        restore()
        raise


def test_sigterm_checkpoints_at_the_end_of_the_step_and_the_next_attempt_starts_there(tmp_path, one_thread):
    """The tiny preset's checkpoint interval (25) and keep_last (2): without the notice, a stop at step 13 would
    go back to step 0."""
    from raytrainer.checkpoint import CheckpointStore

    keep = ["checkpoint.every_steps=25"]
    trainer, restore = in_process(tmp_path, 30, [*keep, "faults=[{step: 12, kind: sigterm}]"])
    try:
        with pytest.raises(Preempted, match="checkpoint 13 is committed"):
            trainer.fit()
    finally:
        restore()
    assert max(h["step"] for h in trainer.history) == 12
    assert CheckpointStore(str(tmp_path / "runs"), "pre").latest_complete() == 13
    resumed, restore = in_process(tmp_path, 30, keep)
    try:
        assert resumed.restore() == 13  # no step lost
    finally:
        restore()


def test_the_notice_can_be_switched_off(tmp_path, one_thread):
    trainer, restore = in_process(tmp_path, 6, ["checkpoint.on_preemption=false"])
    try:
        trainer.env.notice = lambda: "SIGTERM"
        assert trainer.fit()["step"] == 6
    finally:
        restore()


def run_two_ranks(rank: int, world_size: int, out_dir, dataset, storage: str):
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import broadcast_from_rank0, build_trainer

    cfg = micro_config(dataset, storage, name="two", steps=20, extra=[
        "parallel.max_workers=2", "checkpoint.every_steps=25", "faults=[{step: 9, kind: sigterm, rank: 1}]"])
    notice = StopNotice()
    restore = watch_for_stop(notice)  # each spawned rank's main thread: a real signal handler
    env = WorkerEnv(rank=rank, world_size=world_size, broadcast=broadcast_from_rank0, nodes=["node-a", "node-b"],
                    notice=notice.reason)
    trainer = build_trainer(cfg, env, torch.device("cpu"))
    error = None
    try:
        trainer.fit()
    except Preempted as e:
        error = str(e)
    finally:
        restore()
    save_result(out_dir, "two", rank, {"steps": [h["step"] for h in trainer.history if "loss" in h],
                                       "error": error})


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_every_rank_at_the_same_step(tmp_path):
    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.metrics.history import read_history
    from raytrainer.storage import open_storage

    dataset = make_dataset(tmp_path)
    storage = tmp_path / "runs"
    spawn(run_two_ranks, 2, tmp_path, dataset, str(storage))
    r0, r1 = (load_result(tmp_path, "two", rank) for rank in range(2))
    assert r0["steps"] == r1["steps"] == list(range(10))
    assert "rank(s) 1 on node(s) node-b were told to stop" in r0["error"] and r0["error"] == r1["error"]
    assert CheckpointStore(str(storage), "two").latest_complete() == 10
    (record,) = [e for e in read_history(open_storage(str(storage / "two"))).events if e["kind"] == "preempted"]
    assert (record["step"], record["ranks"], record["nodes"]) == (10, [1], ["node-b"])


def test_the_failure_policy_restarts_a_preempted_group_without_counting_a_failure():
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, create_failure_policy
    from ray.train.v2.api.exceptions import WorkerGroupError

    from raytrainer.train.ray_failure import GuardianAbortPolicy

    policy = GuardianAbortPolicy(create_failure_policy(FailureConfig(max_failures=0)))
    preempted = WorkerGroupError("rank 1 stopped", {
        0: UserExceptionWithTraceback(Preempted("step 10: rank(s) 1 were told to stop"), "tb"),
        1: UserExceptionWithTraceback(Preempted("step 10: rank(s) 1 were told to stop"), "tb")})
    assert [policy.make_decision(preempted) for _ in range(3)] == [FailureDecision.RETRY] * 3
    crashed = WorkerGroupError("rank 1 died", {1: UserExceptionWithTraceback(RuntimeError("boom"), "tb")})
    assert policy.make_decision(crashed) == FailureDecision.RAISE  # max_failures=0: a real failure still counts


def test_rays_drain_notice_names_the_node_and_when_it_goes(monkeypatch):
    import re
    import time
    from types import SimpleNamespace

    from ray.train.v2._internal.execution import context
    from ray.train.v2.api.preemption import PreemptionInfo

    from raytrainer.train.ray_notice import ray_drain_notice

    marked = SimpleNamespace(preemption_context=SimpleNamespace(preemption_info=None))
    monkeypatch.setattr(context, "get_train_context", lambda: marked)
    assert ray_drain_notice() is None  # no drain: no notice
    deadline_ms = int((time.time() + 90) * 1000)
    marked.preemption_context.preemption_info = PreemptionInfo(deadline_ms, {"node-b": [1], "node-a": [0]})
    notice = ray_drain_notice()
    assert notice.startswith("Ray is draining node(s) node-a, node-b for preemption by ")
    assert time.strftime("%H:%M", time.gmtime(deadline_ms / 1000)) in notice
    assert re.search(r"UTC \(in (8[0-9]|90) s\)$", notice), notice


def test_a_pause_request_checkpoints_every_rank_and_ends_the_run_where_the_same_command_resumes(tmp_path, one_thread):
    """Ctrl-C in the driver (raytrainer.live.pause) reaches rank 0 as a pause request: the step ends, the group
    checkpoints with the tiny preset's interval of 25 and keep_last 2, and fit() returns instead of raising, so
    Ray Train ends the run rather than restarting it."""
    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.metrics.history import read_history
    from raytrainer.storage import open_storage

    keep = ["checkpoint.every_steps=25"]
    trainer, restore = in_process(tmp_path, 30, keep)
    asked: list[int] = []

    def pause_request():  # the monitor's answer, as rank 0 polls it
        asked.append(len(trainer.history))
        return "Ctrl-C in the driver" if len(trainer.history) >= 12 else None

    trainer.env.pause_request = pause_request
    try:
        result = trainer.fit()
    finally:
        restore()
    assert result["paused"] == "Ctrl-C in the driver" and result["step"] == 13
    assert max(h["step"] for h in trainer.history) == 12 and len(set(asked)) == len(asked)  # once per step
    assert CheckpointStore(str(tmp_path / "runs"), "pre").latest_complete() == 13
    history = read_history(open_storage(str(tmp_path / "runs" / "pre")))
    (paused,) = [e for e in history.events if e["kind"] == "paused"]
    assert (paused["step"], paused["reason"]) == (13, "Ctrl-C in the driver")
    assert paused["checkpoint"].endswith("step_00000013")
    assert not [e for e in history.events if e["kind"] in ("finish", "preempted")]
    resumed, restore = in_process(tmp_path, 30, keep)
    try:
        assert resumed.fit()["step"] == 30 and min(h["step"] for h in resumed.history) == 13
    finally:
        restore()

"""Rerun before deciding (and stragglers, on the same two-rank run): a suspicious step is recomputed; the
same numbers again blame the data, different ones blame the hardware, name the rank and node whose numbers
moved, and the clean rerun is applied."""

from __future__ import annotations

import math

import pytest
import torch

from raytrainer.config import GuardianConfig
from raytrainer.fault.guardian import Guardian
from runs import make_dataset, micro_config
from strategy_harness import load_result, save_result, spawn


def numbers(loss: float, grad_norm: float, rank_norms: list[float] | None = None) -> dict:
    norms = rank_norms or [grad_norm]
    return {"loss": loss, "grad_norm": grad_norm, "finite": all(map(math.isfinite, [loss, *norms])),
            "metrics": {"rank_ce_sum": [loss * 100] * len(norms), "rank_grad_norm": norms}}


def warmed(**cfg) -> Guardian:
    g = Guardian(GuardianConfig(warmup_exempt_steps=0, min_window=8, **cfg), run_name="r")
    for step in range(40):
        assert g.decide(step, numbers(3.0 + 0.01 * (step % 3), 1.0)).action == "continue"
    return g


def test_a_spike_that_reproduces_is_the_data_and_is_skipped():
    g = warmed()
    spike = numbers(9.0, 1.0)
    first = g.decide(40, spike)
    assert first.action == "rerun" and "recomputing" in first.reason
    assert g.state_dict()["history"][-1][0] == 39  # asking for a rerun records nothing
    final = g.decide(40, spike, rerun=numbers(9.0, 1.0))
    assert (final.action, final.rerun, final.suspects) == ("skip", "reproduced", [])
    assert g.events[-1]["event"] == "skip" and g.events[-1]["rerun"] == "reproduced"


def test_a_one_off_corruption_is_the_hardware_names_the_rank_and_applies_the_rerun():
    g = warmed()
    nodes = ["node-a", "node-b"]
    # Rank 1's gradients were corrupted after the reduction: its norm alone is off; rank 0's looks fine.
    first = g.decide(40, numbers(3.0, 1.0, [1.0, 3e18]), nodes=nodes)
    assert first.action == "rerun" and "ranks' gradient norms disagree" in first.reason
    final = g.decide(40, numbers(3.0, 1.0, [1.0, 3e18]), rerun=numbers(3.0, 1.0, [1.0, 1.0]), nodes=nodes)
    assert (final.action, final.rerun, final.suspects, final.exclude_nodes) == ("continue", "transient", [1], [])
    (event,) = [e for e in g.events if e["event"] == "suspect_hardware"]
    assert event["ranks"] == [1] and event["nodes"] == ["node-b"] and "rank 1 on node node-b" in event["reason"]
    assert g.state_dict()["detectors"]["losses"][-1] == [40, 3.0]  # the rerun was judged healthy and learnt

    # The second transient fault on node-b reaches guardian.suspect_node_limit=2: the node is excluded.
    again = g.decide(41, numbers(float("nan"), 1.0, [1.0, 1.0]), nodes=nodes)
    assert again.action == "rerun"
    bad = {**numbers(float("nan"), 1.0, [1.0, 1.0]), "metrics": {"rank_ce_sum": [300.0, float("nan")],
                                                                   "rank_grad_norm": [1.0, 1.0]}}
    final = g.decide(41, bad, rerun=numbers(3.0, 1.0, [1.0, 1.0]), nodes=nodes)
    assert (final.action, final.suspects, final.exclude_nodes) == ("continue", [1], ["node-b"])
    assert [e["node"] for e in g.events if e["event"] == "exclude_node"] == ["node-b"]
    restored = Guardian(GuardianConfig(warmup_exempt_steps=0, min_window=8), run_name="r")
    restored.replace_state(g.state_dict())
    assert restored.excluded_nodes == ["node-b"]


def test_a_transient_fault_whose_rerun_is_still_bad_is_not_applied():
    g = warmed()
    g.decide(40, numbers(9.0, 1.0))
    final = g.decide(40, numbers(9.0, 1.0), rerun=numbers(8.0, 1.0))
    assert (final.action, final.rerun) == ("skip", "transient")


def test_reruns_can_be_switched_off_and_divergence_is_never_rerun():
    g = warmed(rerun=False)
    assert g.decide(40, numbers(9.0, 1.0)).action == "skip"
    d = warmed(divergence_steps=3, divergence_margin=0.2, spike_min_rise=0.5)
    d.on_checkpoint(20)
    actions = [d.decide(s, numbers(3.35, 1.0)).action for s in range(40, 43)]
    assert actions == ["continue", "continue", "rollback"]  # no rerun: a trend is not a transient fault


def in_process_run(tmp_path, name: str, faults: str, steps: int = 34) -> tuple[list[dict], list[dict]]:
    """A micro run with the tiny preset's guardian thresholds, one fault list; (history, guardian events)."""
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import build_trainer

    dataset = make_dataset(tmp_path)
    extra = [f"faults=[{faults}]"] if faults else []
    cfg = micro_config(dataset, str(tmp_path / name), name=name, steps=steps, extra=extra)
    events: list[dict] = []
    guardian = Guardian(cfg.guardian, cfg.run.name, on_event=events.append)
    trainer = build_trainer(cfg, WorkerEnv(nodes=["this-node"]), torch.device("cpu"), guardian=guardian)
    return trainer.fit()["history"], events


def test_a_flipped_bit_is_rerun_and_the_run_follows_the_clean_curve_exactly(tmp_path, one_thread):
    clean, _ = in_process_run(tmp_path, "clean", "")
    flipped, events = in_process_run(tmp_path, "flipped", "{step: 25, kind: grad_bitflip}")
    at = next(h for h in flipped if h.get("step") == 25)
    assert (at["action"], at["rerun"], at["applied"]) == ("continue", "transient", True)
    (suspect,) = [e for e in events if e["event"] == "suspect_hardware"]
    assert suspect["ranks"] == [0] and suspect["nodes"] == ["this-node"] and suspect["step"] == 25
    # The rerun restored the RNG and reused the micro-batches: every step, the flipped one included, trained
    # exactly as the clean run did.
    assert [(h["step"], h["loss"]) for h in flipped] == [(h["step"], h["loss"]) for h in clean]


def test_a_poisoned_batch_reproduces_and_is_skipped_as_data(tmp_path, one_thread):
    history, events = in_process_run(tmp_path, "poisoned", "{step: 25, kind: loss_spike}")
    at = next(h for h in history if h.get("step") == 25)
    assert (at["action"], at["rerun"], at["applied"]) == ("skip", "reproduced", False)
    assert not [e for e in events if e["event"] == "suspect_hardware"]


def run_two_ranks(rank: int, world_size: int, out_dir, dataset, storage: str):
    from raytrainer.fault.events import EventLog, RunStore
    from raytrainer.train.loop import NodesExcluded, WorkerEnv
    from raytrainer.train.ray_entry import broadcast_from_rank0, build_trainer

    cfg = micro_config(dataset, storage, name="two", steps=40, extra=[
        "parallel.max_workers=2", "checkpoint.every_steps=10",
        "faults=[{step: 22, kind: grad_bitflip, rank: 1}, {step: 27, kind: loss_spike, rank: 0}, "
        "{step: 27, kind: loss_spike, rank: 1}, "
        "{step: 31, kind: grad_bitflip, rank: 1}, {step: 1, kind: slow_rank, rank: 0, steps: 30, seconds: 0.25}]"])
    env = WorkerEnv(rank=rank, world_size=world_size, broadcast=broadcast_from_rank0, nodes=["node-a", "node-b"])
    events = EventLog(RunStore.for_run(cfg)) if rank == 0 else None
    guardian = Guardian(cfg.guardian, cfg.run.name, on_event=events.append if events else None)
    trainer = build_trainer(cfg, env, torch.device("cpu"), guardian=guardian if rank == 0 else None)
    error = None
    try:
        trainer.fit()
    except NodesExcluded as e:
        error = str(e)
    if events is not None:
        events.flush()
    save_result(out_dir, "two", rank, {"history": [h for h in trainer.history if "loss" in h], "error": error,
                                       "events": guardian.events if rank == 0 else []})


@pytest.mark.slow
def test_two_ranks_name_the_corrupted_rank_and_exclude_its_node_and_name_a_straggler(tmp_path):
    from raytrainer.checkpoint import CheckpointStore

    dataset = make_dataset(tmp_path)
    storage = tmp_path / "runs"
    spawn(run_two_ranks, 2, tmp_path, dataset, str(storage))
    r0, r1 = (load_result(tmp_path, "two", rank) for rank in range(2))
    suspects = [e for e in r0["events"] if e["event"] == "suspect_hardware"]
    assert [(e["step"], e["ranks"], e["nodes"]) for e in suspects] == [(22, [1], ["node-b"]), (31, [1], ["node-b"])]
    by_step = {h["step"]: h for h in r0["history"]}
    assert (by_step[22]["rerun"], by_step[22]["applied"]) == ("transient", True)
    assert (by_step[27]["action"], by_step[27]["rerun"]) == ("skip", "reproduced")
    # Both ranks applied the same updates: their views of every step agree.
    assert [(h["step"], h["loss"], h["applied"]) for h in r0["history"]] == \
        [(h["step"], h["loss"], h["applied"]) for h in r1["history"]]
    # The second fault on node-b excluded it: step 32 was checkpointed and committed before the group ended.
    assert "excluded node(s) node-b" in r0["error"] and "excluded node(s) node-b" in r1["error"]
    assert max(by_step) == 31
    assert CheckpointStore(str(storage), "two").latest_complete() == 32
    # Rank 0's forwards were 0.25 s slower from step 1 on: named once, on its node, as soon as the window of
    # guardian.straggler_steps=20 steps is full.
    slow = [(e["event"], e["step"], e["rank"], e.get("node")) for e in r0["events"] if "straggler" in e["event"]]
    assert slow == [("straggler", 19, 0, "node-a")]

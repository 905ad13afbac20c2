"""The guardian actor on a small local Ray: created by the driver, found by name from a worker."""

from __future__ import annotations

import gc
import math

import pytest

from raytrainer.config import Config
from raytrainer.fault.events import RunStore, read_events


@pytest.mark.slow
def test_guardian_actor_round_trip_from_a_worker(tmp_path):
    ray = pytest.importorskip("ray")
    from raytrainer.fault.guardian_actor import GuardianClient, start_guardian, stop_guardian

    cfg = Config.model_validate({
        "checkpoint": {"storage": str(tmp_path / "runs")},
        "run": {"name": "actor-test"},
        "guardian": {"skips_before_rollback": 1, "rollback_skip_batches": 2},
    })
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        start_guardian(cfg)  # the driver drops the client: the module keeps the actor alive
        gc.collect()

        @ray.remote(num_cpus=1)
        def rank0_worker() -> list:
            client = GuardianClient.connect("actor-test")
            out = []
            for step in range(60):
                loss = math.nan if step in (40, 45) else 3.0 + 0.01 * (step % 3)
                numbers = {"loss": loss, "grad_norm": 1.0}
                decision = client.decide(step, numbers, {"batch": step})
                if decision.action == "rerun":  # as the loop does: the same numbers again, so reproduced
                    decision = client.decide(step, numbers, {"batch": step}, rerun=numbers)
                out.append((step, decision.action, decision.rollback_to, decision.skip_range))
                if decision.action == "rollback":
                    break
                if step + 1 == 30:
                    client.on_checkpoint(30)
            return out

        decisions = ray.get(rank0_worker.remote(), timeout=60)
        assert [d for d in decisions if d[1] != "continue"] == [(40, "skip", None, None),
                                                               (45, "rollback", 30, (40, 48))]
        # A second worker process (after a worker-group restart) sees the same guardian and its state.
        client = GuardianClient.connect("actor-test")
        state = client.state_dict()
        assert state["skipped"] == [[40, 48]] and len(state["rollbacks"]) == 1
        assert client.skipped_ranges() == [(40, 48)]
        assert client.flush()
        events = read_events(RunStore.for_run(cfg))
        assert [(e["event"], e["step"]) for e in events] == [("checkpoint", 30), ("skip", 40),
                                                             ("rollback", 45)]
        stop_guardian("actor-test")
        with pytest.raises(RuntimeError, match="no guardian actor"):
            GuardianClient.connect("actor-test", wait_s=1.0)
    finally:
        ray.shutdown()

"""Elastic runs that shrink within seconds when a node is lost abruptly.

Ray Train's elastic policy (ray/train/v2/_internal/execution/scaling_policy/elastic.py) sizes a restarted
worker group from the AutoscalingCoordinator's per-node reservations. Those come from `ray.nodes()`,
refreshed every 20 s (`_AutoscalingCoordinatorActor.TICK_INTERVAL_S`), and `ray.nodes()` itself keeps a
node whose raylet died without unregistering (a crash, a SIGKILL, a machine gone) "Alive" until the GCS
health checks give up on it: `health_check_failure_threshold` x `health_check_period_ms`, about 15 s with
the defaults, longer when the machine no longer answers at all. The survivors' collectives fail within
seconds, so the restart decision is taken while the dead node still counts: the group is asked for at its
old size, and its placement group, which can never be placed, is waited on for
RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (worker_group.py `_start_impl`, `pg_handle.wait`) before the
controller tries again with the right size.

`NodeLossAwareElasticPolicy` fixes both halves:

* the worker count is taken over the reserved nodes that are alive in the GCS *and* whose raylet accepts
  a TCP connection now (the port the GCS health-checks), and the next group is kept off the nodes that
  failed that probe, which the GCS may still offer for a while;
* only a run that has not trained yet waits the long start timeout for capacity
  (parallel.worker_start_timeout_s); a restart or resize waits parallel.worker_restart_timeout_s, after
  which the size is chosen again from the nodes still there, so a wrong guess costs seconds, not minutes.

The nodes the run's guardian excluded after repeated transient faults (`GuardianClient.excluded_nodes`)
are left out the same way, for the rest of the run, and so are nodes Ray is draining (a preemption notice):
their raylet still answers, but Ray places nothing new there, so counting them would make the next group
wait for a placement that never comes.

`NodeLossAwareTorchTrainer` is a TorchTrainer that hands this policy to the controller for elastic runs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from ray.train.v2._internal.execution.controller.state import (
    RunningState,
    SchedulingState,
    TrainControllerState,
)
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, ResizeDecision
from ray.train.v2.api.config import ScalingConfig
from ray.train.v2.api.result import Result

log = logging.getLogger("raytrainer.elastic")

# Ray's built-in label that every node carries, used to keep a worker group off the nodes found dead.
NODE_ID_LABEL = "ray.io/node-id"
# A live raylet accepts a connection in well under a millisecond; one that died refuses it at once, and a
# vanished machine does not answer: a second is plenty to tell them apart.
DEFAULT_PROBE_TIMEOUT_S = 1.0
# While no group can be started (fewer nodes than min_workers) the controller asks for a decision on every
# loop iteration: answer from the last look at the cluster for this long instead of asking the GCS again.
LIVENESS_CACHE_S = 1.0
_MAX_PROBE_THREADS = 32


def raylet_answers(address: str, port: int, timeout_s: float) -> bool:
    """Whether a raylet listens at address:port: the TCP handshake alone, so no Ray RPC (or TLS) is needed."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def live_nodes(node_ids: Iterable[str], probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S) -> set[str]:
    """The given nodes that the GCS lists as alive and whose raylet answers now (probed in parallel)."""
    wanted = set(node_ids)
    alive = [n for n in ray.nodes() if n["NodeID"] in wanted and n["Alive"]]
    if not alive:
        return set()
    with ThreadPoolExecutor(max_workers=min(len(alive), _MAX_PROBE_THREADS)) as pool:
        answers = list(pool.map(
            lambda n: raylet_answers(n["NodeManagerAddress"], int(n["NodeManagerPort"]), probe_timeout_s), alive))
    return {n["NodeID"] for n, ok in zip(alive, answers, strict=True) if ok}


def draining_nodes() -> set[str]:
    """The nodes Ray is draining (for preemption, or to scale down): it places no new work on them."""
    try:
        from ray._private import state as ray_state

        return set(ray_state.state.get_draining_nodes())
    except Exception:  # a GCS hiccup, or a Ray without the call: leave sizing to the liveness probe
        return set()


class NodeLossAwareElasticPolicy(ElasticScalingPolicy):
    """Ray Train's elastic policy, counting only nodes that are alive now (see the module docstring).

    It runs inside the Ray Train controller actor, as its scaling policy and one of its controller
    callbacks, so the hooks below are called by the controller around every worker-group start.
    """

    def __init__(self, scaling_config: ScalingConfig, first_start_timeout_s: float, restart_timeout_s: float,
                 probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S, run_name: str | None = None,
                 workers_per_replica: int = 1):
        super().__init__(scaling_config)
        self.run_name = run_name  # whose guardian names the nodes to leave out
        # A tensor-parallel run resizes in whole groups (parallel.tp workers): 7 places for tp=2 start 6 workers.
        self.workers_per_replica = workers_per_replica
        self.first_start_timeout_s = first_start_timeout_s
        # A restart never waits longer than a first start would.
        self.restart_timeout_s = min(restart_timeout_s, first_start_timeout_s)
        self.probe_timeout_s = probe_timeout_s
        self.has_trained = False
        self.lost_nodes: set[str] = set()
        self._looked: tuple[float, frozenset[str], set[str]] | None = None  # (when, asked about, live)
        self._asked: tuple[float, set[str]] | None = None  # (when, the guardian's excluded nodes)
        # Every node the guardian has excluded, for the rest of the run: also while it cannot be asked (it is
        # restarting), and also when Ray's reservations for the next group do not list the node at all (then
        # only the label selector keeps a worker off its free slot).
        self.excluded: set[str] = set()
        # Workers Ray's reservation holds on nodes the run leaves out (see _get_num_workers_for_resource_request).
        self.held_back = 0

    def _live(self, node_ids: frozenset[str]) -> set[str]:
        now = time.monotonic()
        if self._looked is not None and self._looked[1] == node_ids and now - self._looked[0] < LIVENESS_CACHE_S:
            return self._looked[2]
        live = live_nodes(node_ids, self.probe_timeout_s) - draining_nodes()
        self._looked = (time.monotonic(), node_ids, live)
        return live

    def _count_possible_workers(self, reserved_resources: dict[str, dict[str, float]]) -> int:
        n = self._count_live_workers(reserved_resources)
        return n - n % self.workers_per_replica

    def _count_live_workers(self, reserved_resources: dict[str, dict[str, float]]) -> int:
        try:
            live = self._live(frozenset(reserved_resources))
        except Exception:  # a GCS hiccup must not fail the run: fall back to Ray's own view
            log.warning("could not list the cluster's nodes; sizing the worker group from Ray's reservations",
                        exc_info=True)
            return super()._count_possible_workers(reserved_resources)
        self.excluded |= self.excluded_nodes()
        live = live - self.excluded  # a new set: the liveness cache keeps what the probe found
        lost = set(reserved_resources) - live
        if lost - self.lost_nodes:
            log.warning("node(s) %s are gone, being drained, or excluded by the guardian; sizing the worker group "
                        "without them", ", ".join(sorted(lost - self.lost_nodes)))
        self.lost_nodes = lost | self.excluded
        self.held_back = super()._count_possible_workers({n: r for n, r in reserved_resources.items() if n in lost})
        return super()._count_possible_workers({n: r for n, r in reserved_resources.items() if n in live})

    def _get_num_workers_for_resource_request(self) -> int:
        # Ray reserves max_workers' worth on nodes of its own choosing, and an excluded or draining node with
        # room is chosen again and again: a run could wait forever beside a free node it may use. Asking for
        # as many more as those nodes hold lets the reservation reach the others (on an autoscaling cluster,
        # new ones).
        return self.scaling_config.max_workers + self.held_back

    def excluded_nodes(self) -> set[str]:
        """The nodes the run's guardian excluded (none when it cannot be asked: the run must go on)."""
        if self.run_name is None:
            return set()
        now = time.monotonic()
        if self._asked is not None and now - self._asked[0] < LIVENESS_CACHE_S:
            return self._asked[1]
        from raytrainer.fault.guardian_actor import NAMESPACE, actor_name

        try:
            actor = ray.get_actor(actor_name(self.run_name), namespace=NAMESPACE)
            excluded = set(ray.get(actor.excluded_nodes.remote(), timeout=10))
        except Exception:  # no guardian (guardian.enabled=false), or it is restarting
            excluded = set()
        self._asked = (time.monotonic(), excluded)
        return excluded

    def on_controller_start_worker_group(self, *, scaling_config: ScalingConfig,
                                         num_workers: int) -> dict[str, str] | None:
        # The GCS still offers a dead node's resources until it declares the node dead; a bundle placed
        # there would wait for that. Only a plain (or absent) selector can be extended; a per-worker list
        # is left to Ray.
        if not self.lost_nodes or isinstance(scaling_config.label_selector, list):
            return None
        selector = dict(scaling_config.label_selector or {})
        if NODE_ID_LABEL in selector:
            return None
        selector[NODE_ID_LABEL] = f"!in({','.join(sorted(self.lost_nodes))})"
        return selector

    def before_controller_execute_resize_decision(self, resize_decision: ResizeDecision) -> None:
        # WorkerGroup reads its placement timeout from this variable when it is created, right after this
        # hook, in this (the controller's) process.
        timeout_s = self.restart_timeout_s if self.has_trained else self.first_start_timeout_s
        os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = str(timeout_s)

    def after_controller_state_update(self, previous_state: TrainControllerState,
                                      current_state: TrainControllerState) -> None:
        # Scheduling -> Running: a worker group was placed and started, so the run has had its capacity.
        if isinstance(previous_state, SchedulingState) and isinstance(current_state, RunningState):
            self.has_trained = True


class NodeLossAwareTorchTrainer(TorchTrainer):
    """A TorchTrainer whose elastic runs use NodeLossAwareElasticPolicy; fixed-size runs are unchanged."""

    def __init__(self, *args: Any, first_start_timeout_s: float, restart_timeout_s: float,
                 run_name: str | None = None, workers_per_replica: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.first_start_timeout_s = first_start_timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.run_name = run_name
        self.workers_per_replica = workers_per_replica

    def make_scaling_policy(self) -> NodeLossAwareElasticPolicy:
        return NodeLossAwareElasticPolicy(self.scaling_config, self.first_start_timeout_s, self.restart_timeout_s,
                                          run_name=self.run_name, workers_per_replica=self.workers_per_replica)

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Result:
        # DataParallelTrainer.fit builds Ray's policy and passes it here, on its way to the controller actor.
        if self.scaling_config.elasticity_enabled:
            controller_init_kwargs["scaling_policy"] = self.make_scaling_policy()
        return super()._initialize_and_run_controller(**controller_init_kwargs)

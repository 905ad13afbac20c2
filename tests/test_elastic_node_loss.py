"""An elastic run loses a node abruptly (its raylet and every process on it SIGKILLed, as when a machine
vanishes), is training again on the remaining worker within a minute, with the default
parallel.worker_start_timeout_s (600 s) left as it is, and grows back to two workers when a node joins.
A node drained for preemption and a node the guardian excludes get no worker of the next group. Before
that, the scaling policy that makes it so (raytrainer.elastic), on its own: which nodes it counts, where it
keeps the next group off, and how long each start may wait for placement."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytrainer.checkpoint import CheckpointStore
from runs import MICRO, make_dataset

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
SLOT = {"num_cpus": 2, "resources": {"trainer_slot": 1}}


# --------------------------------------------------------------------------- the policy, without a cluster


def elastic_scaling():
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1, "trainer_slot": 1})


def fake_node(node_id: str, port: int, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port}


def test_workers_are_counted_only_on_nodes_alive_now(monkeypatch):
    import socket

    from ray._private.label_utils import validate_label_selector

    from raytrainer import elastic

    listening = socket.create_server(("127.0.0.1", 0))
    with socket.create_server(("127.0.0.1", 0)) as gone:  # a raylet that died: its port refuses
        dead_port = gone.getsockname()[1]
    try:
        nodes = [fake_node("a" * 56, listening.getsockname()[1]), fake_node("b" * 56, dead_port),
                 fake_node("c" * 56, listening.getsockname()[1], alive=False)]
        monkeypatch.setattr(elastic.ray, "nodes", lambda: nodes)
        policy = elastic.NodeLossAwareElasticPolicy(elastic_scaling(), 600, 30)
        slot = {"CPU": 2.0, "trainer_slot": 1.0}
        assert policy._count_possible_workers({n["NodeID"]: slot for n in nodes}) == 1
        assert policy.lost_nodes == {"b" * 56, "c" * 56}
        selector = policy.on_controller_start_worker_group(scaling_config=elastic_scaling(), num_workers=1)
        assert selector == {elastic.NODE_ID_LABEL: f"!in({'b' * 56},{'c' * 56})"}
        assert validate_label_selector(selector) is None  # what Ray accepts as a placement-group selector
        # Every node back: both count, and nothing is excluded any more.
        nodes[1:] = [fake_node("b" * 56, listening.getsockname()[1])]
        assert policy._count_possible_workers({n["NodeID"]: slot for n in nodes}) == 2
        assert policy.on_controller_start_worker_group(scaling_config=elastic_scaling(), num_workers=2) is None
    finally:
        listening.close()


def test_nodes_the_guardian_excluded_are_left_out_like_lost_ones(monkeypatch):
    import socket

    from raytrainer import elastic

    listening = socket.create_server(("127.0.0.1", 0))
    try:
        nodes = [fake_node("a" * 56, listening.getsockname()[1]), fake_node("b" * 56, listening.getsockname()[1])]
        monkeypatch.setattr(elastic.ray, "nodes", lambda: nodes)
        policy = elastic.NodeLossAwareElasticPolicy(elastic_scaling(), 600, 30, run_name="r")
        asked = []

        class Guardian:  # the run's guardian actor, as ray.get_actor finds it
            class excluded_nodes:  # noqa: N801 - mimics an actor method handle
                @staticmethod
                def remote():
                    asked.append(True)
                    return ["b" * 56]

        monkeypatch.setattr(elastic.ray, "get_actor", lambda name, namespace: Guardian)
        monkeypatch.setattr(elastic.ray, "get", lambda ref, timeout: ref)
        clock = [1000.0]  # the policy asks the guardian (and probes the nodes) at most once a second
        monkeypatch.setattr(elastic.time, "monotonic", lambda: clock[0])
        slot = {"CPU": 2.0, "trainer_slot": 1.0}
        assert policy._count_possible_workers({n["NodeID"]: slot for n in nodes}) == 1 and asked
        selector = policy.on_controller_start_worker_group(scaling_config=elastic_scaling(), num_workers=1)
        assert selector == {elastic.NODE_ID_LABEL: f"!in({'b' * 56})"}
        # The reservation holds a worker's room on the excluded node: the next request asks for one more, so that
        # Ray's reservation can reach a node the run may use.
        assert policy._get_num_workers_for_resource_request() == elastic_scaling().max_workers + 1
        # Ray's reservations for the next group may not list the excluded node: its free slot is still kept out.
        assert policy._count_possible_workers({"a" * 56: slot}) == 1
        assert policy._get_num_workers_for_resource_request() == elastic_scaling().max_workers
        selector = policy.on_controller_start_worker_group(scaling_config=elastic_scaling(), num_workers=1)
        assert selector == {elastic.NODE_ID_LABEL: f"!in({'b' * 56})"}
        # The guardian cannot be asked (it is restarting): what it excluded stays excluded ...
        monkeypatch.setattr(elastic.ray, "get_actor", lambda name, namespace: (_ for _ in ()).throw(ValueError()))
        clock[0] += 1.5
        assert policy._count_possible_workers({n["NodeID"]: slot for n in nodes}) == 1
        # ... and a run without a guardian (switched off) excludes nothing: the run goes on.
        fresh = elastic.NodeLossAwareElasticPolicy(elastic_scaling(), 600, 30, run_name="r")
        assert fresh._count_possible_workers({n["NodeID"]: slot for n in nodes}) == 2
    finally:
        listening.close()


def test_nodes_ray_is_draining_are_left_out(monkeypatch):
    import socket

    from raytrainer import elastic

    listening = socket.create_server(("127.0.0.1", 0))
    try:
        nodes = [fake_node("a" * 56, listening.getsockname()[1]), fake_node("b" * 56, listening.getsockname()[1])]
        monkeypatch.setattr(elastic.ray, "nodes", lambda: nodes)
        draining = {"b" * 56}
        monkeypatch.setattr(elastic, "draining_nodes", lambda: set(draining))
        policy = elastic.NodeLossAwareElasticPolicy(elastic_scaling(), 600, 30)
        slot = {"CPU": 2.0, "trainer_slot": 1.0}
        assert policy._count_possible_workers({n["NodeID"]: slot for n in nodes}) == 1
        selector = policy.on_controller_start_worker_group(scaling_config=elastic_scaling(), num_workers=1)
        assert selector == {elastic.NODE_ID_LABEL: f"!in({'b' * 56})"}
    finally:
        listening.close()


def test_only_the_first_start_waits_the_start_timeout(monkeypatch):
    from ray.train.v2._internal.execution.controller.state import RunningState, SchedulingState
    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

    from raytrainer.elastic import NodeLossAwareElasticPolicy

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    policy = NodeLossAwareElasticPolicy(elastic_scaling(), first_start_timeout_s=600, restart_timeout_s=30)
    decision = ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1})
    policy.before_controller_execute_resize_decision(decision)
    assert float(os.environ[START_TIMEOUT_ENV]) == 600  # no capacity yet: may wait for it
    policy.after_controller_state_update(SchedulingState(decision), RunningState())
    policy.before_controller_execute_resize_decision(decision)
    assert float(os.environ[START_TIMEOUT_ENV]) == 30  # trained once: a restart re-sizes after 30 s
    assert NodeLossAwareElasticPolicy(elastic_scaling(), 20, 30).restart_timeout_s == 20  # never longer


def test_elastic_runs_get_the_policy_and_fixed_runs_keep_rays(monkeypatch, tmp_path):
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import create_failure_policy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raytrainer.config import load_config
    from raytrainer.elastic import NodeLossAwareElasticPolicy
    from raytrainer.launch import build_torch_trainer

    handed = {}
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller",
                        lambda self, **kwargs: handed.update(kwargs))
    monkeypatch.setenv(START_TIMEOUT_ENV, "45")
    rays = object()
    for workers, expected in (("2", None), ("1", NodeLossAwareElasticPolicy)):
        cfg = load_config("tiny", [f"parallel.min_workers={workers}", "parallel.max_workers=2",
                                   "parallel.worker_restart_timeout_s=12"])
        build_torch_trainer(cfg, str(tmp_path), None)._initialize_and_run_controller(
            scaling_policy=rays, failure_policy=create_failure_policy(FailureConfig()))
        policy = handed["scaling_policy"]
        if expected is None:
            assert policy is rays
        else:
            assert isinstance(policy, expected)
            assert (policy.first_start_timeout_s, policy.restart_timeout_s) == (45, 12)


# --------------------------------------------------------------------------- a node vanishes mid-run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("node-loss-data"))


def pretrain_cmd(dataset: Path, storage: Path, name: str, address: str, extra: list[str]) -> list[str]:
    args = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", "tiny"]
    for item in [*MICRO, f"data.path={dataset}", f"checkpoint.storage={storage}", f"run.name={name}",
                 f"run.address={address}", *extra]:
        args += ["--set", item]
    return args


ELASTIC = ["train.steps=100000", "checkpoint.every_steps=5", "parallel.min_workers=1", "parallel.max_workers=2",
           "parallel.extra_resources={trainer_slot: 1}", "parallel.max_failures=-1"]


def checkpoint_worlds(store: CheckpointStore) -> list[tuple[int, int]]:
    try:
        return [(c.step, c.world_size) for c in store.list() if c.complete]
    except Exception:  # a listing can race a save or a retention delete: read again on the next poll
        return []


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the job exited with {proc.returncode} while waiting for {what}:\n{tail(log)}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n{tail(log)}")


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def guardian_events(run_dir: Path, kind: str) -> list[dict]:
    """The guardian's events of one kind, as far as they are written. The guardian actor outlives worker-group
    restarts (see pick_doomed)."""
    from raytrainer.fault.events import RunStore, read_events

    try:
        return [e for e in read_events(RunStore.local(run_dir / "guardian")) if e["event"] == kind]
    except OSError:
        return []


def resumes_after(run_dir: Path, t: float) -> list[dict]:
    """The guardian's `resumed` events (logged at the first step finished after a restore, with its wall
    time) newer than wall time t."""
    return [e for e in guardian_events(run_dir, "resumed") if e["time"] >= t]


def node_processes(node) -> list:
    """The psutil processes of a Cluster node: its raylet and everything the raylet started."""
    import psutil
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


def hosts(node, actor_class: str) -> bool:
    """Whether an actor of this class runs on the node (Ray titles an actor's process ray::<class>...)."""
    import psutil

    for proc in node_processes(node):
        try:
            if any(actor_class in part for part in proc.cmdline()):
                return True
        except psutil.Error:
            pass
    return False


def pick_doomed(nodes: list) -> object:
    """The worker node to lose: the last one that does not host the guardian actor, whose `resumed` event
    (the first step after the restart, with its wall time) is what this test times. The guardian is pinned
    only softly to the driver's node, so it can land on a worker node; losing it there is another story."""
    return next((n for n in reversed(nodes) if not hosts(n, "GuardianActor")), nodes[-1])


def vanish(node) -> None:
    """SIGKILL a node's raylet and every process it started (workers, agents) and the node's other daemons,
    all at once: nothing on the node gets to say goodbye, unlike Cluster.remove_node, whose raylet
    unregisters first. Ray learns of the loss only through its health checks and dropped connections."""
    from ray._private import ray_constants

    victims = [p.pid for p in node_processes(node)]
    victims += [info.process.pid for kind, infos in node.all_processes.items()
                if kind != ray_constants.PROCESS_TYPE_RAYLET for info in infos]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.kill_raylet(check_alive=False)  # reaps the killed raylet, so it is no zombie


def start_job(cluster, dataset: Path, storage: Path, name: str, log: Path,
              extra: list[str] | None = None) -> subprocess.Popen:
    """jobs/pretrain.py, elastic over 1..2 workers, as a driver on the cluster; its output goes to log."""
    env = {k: v for k, v in os.environ.items() if k != START_TIMEOUT_ENV}
    env.update(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(pretrain_cmd(dataset, storage, name, cluster.address, [*ELASTIC, *(extra or [])]),
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def stop_job(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_training_resumes_on_the_remaining_worker_within_a_minute_of_an_abrupt_node_loss_and_grows_back(
        dataset, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # The cluster's processes (the Ray Train controller among them) inherit this environment: the default
    # start timeout must be the one in force, not one an earlier test left behind.
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    proc = None
    log = tmp_path / "job.log"
    try:
        nodes = [cluster.add_node(**SLOT), cluster.add_node(**SLOT)]
        cluster.wait_for_nodes()
        store = CheckpointStore(str(tmp_path), "nodeloss")
        # A healthy run looks for more capacity every 5 s (parallel.elastic_resize_interval_s, default 60), so
        # that growing back is quick; a restart after a loss does not wait for that interval.
        proc = start_job(cluster, dataset, tmp_path, "nodeloss", log, extra=["parallel.elastic_resize_interval_s=5"])
        wait_for(lambda: [s for s, w in checkpoint_worlds(store) if w == 2], 180, "a 2-worker checkpoint", proc,
                 log)
        before = max(s for s, _ in checkpoint_worlds(store))
        doomed = pick_doomed(nodes)
        assert hosts(doomed, "RayTrainWorker")  # each node has one trainer_slot: both host a worker
        killed_at = time.time()
        vanish(doomed)
        shrunk = wait_for(lambda: [s for s, w in checkpoint_worlds(store) if w == 1 and s > before], 90,
                          "a 1-worker checkpoint after the node vanished", proc, log)
        seen_s = time.time() - killed_at
        resumed = wait_for(lambda: resumes_after(tmp_path / "nodeloss", killed_at), 30,
                           "the guardian's record of the first step after the restart", proc, log)[0]
        first_step_s = resumed["time"] - killed_at
        print(f"node lost -> first step on 1 worker: {first_step_s:.1f}s (step {resumed['step']}); first 1-worker "
              f"checkpoint (step {min(shrunk)}) seen after {seen_s:.1f}s")
        last_two = max(s for s, w in checkpoint_worlds(store) if w == 2)
        assert min(shrunk) > last_two >= before  # the 1-worker run went on from the 2-worker checkpoints
        assert resumed["step"] <= min(shrunk)
        assert first_step_s < 60, tail(log)
        # A node joins: the run grows back to two workers, from a 1-worker checkpoint.
        cluster.add_node(**SLOT)
        wait_for(lambda: [s for s, w in checkpoint_worlds(store) if w == 2 and s > max(shrunk)], 180,
                 "a 2-worker checkpoint after a node joined", proc, log)
    finally:
        if proc is not None:
            stop_job(proc)
        cluster.shutdown()


def drain_for_preemption(cluster, node, deadline_s: float) -> None:
    """What a cloud's spot interruption does through Ray: the node is drained for preemption with a deadline.
    Ray Train's preemption watcher sees it and marks every worker of the group."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
    accepted, why = gcs.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "spot interruption (test)", int((time.time() + deadline_s) * 1000))
    assert accepted, why


def run_records(run_dir: Path, kind: str) -> list[dict]:
    """The run's metrics records of one kind, as far as they are written (steps: the applied timeline)."""
    from raytrainer.metrics.history import read_history
    from raytrainer.storage import open_storage

    try:
        history = read_history(open_storage(str(run_dir)))
    except Exception:  # written by another process while we read: look again on the next poll
        return []
    return history.steps if kind == "step" else history.of_kind(kind)


@pytest.mark.slow
def test_a_node_the_guardian_excludes_and_one_drained_for_preemption_get_no_worker_of_the_next_groups(
        dataset, tmp_path, monkeypatch):
    """Two ways a node leaves a run, one after the other in one job on three nodes.

    Silent corruption: rank 1's gradients get a flipped bit twice; each time the rerun tells a transient fault
    and names its node, the second time (guardian.suspect_node_limit=2, the default) the node is excluded: the
    group checkpoints and ends, and the next one is placed on the other nodes, not on the excluded one
    although its slot is free.
    Ray's own preemption notice: a node of the next group is then drained for preemption (deadline a minute away);
    every worker checkpoints at the end of the step the notice reached them, the group ends, and the next one
    starts on the last node from that checkpoint, redoing no step."""
    from ray.cluster_utils import Cluster

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")  # the controller inherits it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    proc = None
    log = tmp_path / "job.log"
    run = tmp_path / "leave"
    try:
        nodes = [cluster.add_node(**SLOT) for _ in range(3)]
        cluster.wait_for_nodes()
        store = CheckpointStore(str(tmp_path), "leave")
        faults = "faults=[{step: 12, kind: grad_bitflip, rank: 1}, {step: 17, kind: grad_bitflip, rank: 1}]"
        proc = start_job(cluster, dataset, tmp_path, "leave", log, extra=["checkpoint.every_steps=50", faults])

        excluded = wait_for(lambda: guardian_events(run, "exclude_node"), 180, "the node's exclusion", proc, log)[0]
        suspects = guardian_events(run, "suspect_hardware")
        assert [(e["step"], e["ranks"]) for e in suspects] == [(12, [1]), (17, [1])], suspects
        assert {n for e in suspects for n in e["nodes"]} == {excluded["node"]}
        resumed = wait_for(lambda: [r for r in run_records(run, "resume") if r["step"] == 18], 120,
                           "the next group's start", proc, log)[0]
        # Ray's reservation for the next group covers two of the three nodes, the excluded one among them or
        # not: one worker or two, and never one on the excluded node, although its slot is free.
        group = resumed["world_size"]
        assert group in (1, 2), resumed
        assert (18, 2) in checkpoint_worlds(store)  # the group checkpointed the step before it ended
        gone = next(n for n in nodes if n.node_id == excluded["node"])
        assert not hosts(gone, "RayTrainWorker")

        wait_for(lambda: [r for r in run_records(run, "step") if r["step"] >= 22], 120, "step 22", proc, log)
        doomed = pick_doomed([n for n in nodes if n is not gone and hosts(n, "RayTrainWorker")])
        assert hosts(doomed, "RayTrainWorker")
        drained_at = time.time()
        drain_for_preemption(cluster, doomed, deadline_s=60)
        resumed = wait_for(lambda: resumes_after(run, drained_at), 120, "the first step of the next group", proc,
                           log)[0]
        stop = wait_for(lambda: run_records(run, "preempted"), 10, "the record of the group's stop", proc, log)[0]
        # The guardian's event is written at once, the metrics record at the recorder's next flush: wait for it.
        restart = wait_for(lambda: [r for r in run_records(run, "resume") if r["step"] == stop["step"]], 60,
                           "the metrics record of the next group's start", proc, log)
        print(f"drained -> checkpoint {stop['step']} by a stopping group, {stop['save_s']:.1f}s to save and commit; "
              f"the next group's first step {resumed['time'] - drained_at:.1f}s after the drain")
        assert "draining" in stop["reason"] and doomed.node_id in stop["reason"], stop
        assert stop["step"] % 50 != 0 and (stop["step"], group) in checkpoint_worlds(store)  # not a scheduled one
        assert resumed["step"] == stop["step"] and resumed["steps_redone"] == 0, resumed
        assert restart and restart[0]["world_size"] == 1, restart  # without the draining node nor the excluded one
        assert not hosts(doomed, "RayTrainWorker") and not hosts(gone, "RayTrainWorker")
    finally:
        if proc is not None:
            stop_job(proc)
        cluster.shutdown()

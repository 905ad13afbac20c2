"""The trainer on real Ray clusters: checkpoints on a real S3 server, resume, a killed worker, capacity and
storage preflight errors, elastic shrink and grow when nodes leave and join, and `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from raytrainer.checkpoint import CheckpointStore
from raytrainer.config import ConfigError
from raytrainer.fault.events import RunStore, read_events
from raytrainer.metrics import read_history
from raytrainer.storage import StorageError, open_storage
from runs import make_dataset, micro_config

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ray-data"))


@pytest.fixture
def local_ray():
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "30"
    yield
    ray.shutdown()


def s3_overrides(server) -> list[str]:
    return [f"checkpoint.s3.endpoint_url={server.endpoint_url}", f"checkpoint.s3.access_key_id={server.access_key}",
            f"checkpoint.s3.secret_access_key={server.secret_key}", "checkpoint.s3.region=us-east-1"]


def test_s3_checkpoints_survive_a_crash_a_hang_and_a_resubmission(dataset, s3_server, s3_url, local_ray):
    """Two workers checkpoint to a real S3 server. A worker process dies mid-run: the run resumes from the
    last checkpoint by itself. The job is submitted again with more steps: it resumes where it ended, and
    retention deletes what Ray Train was told of, which a third submission survives."""
    from raytrainer.launch import run

    extra = [*s3_overrides(s3_server), "parallel.min_workers=2", "parallel.max_workers=2",
             "guardian.step_timeout_s=20"]
    t0 = time.monotonic()
    first_cfg = micro_config(dataset, s3_url, name="s3run", steps=20,
                             extra=[*extra, "faults=[{step: 12, kind: crash, rank: 1}]"])
    first = run(first_cfg)
    assert first["step"] == 20 and first["checkpoint"].startswith("s3://")
    assert first["metrics"]["start_step"] == 10  # the attempt after the crash began at the last checkpoint
    store = CheckpointStore(s3_url, "s3run", s3_server.s3_config())
    assert store.steps() == [10, 20] and {c.world_size for c in store.list()} == {2}
    assert store.verify(20, full=True).ok
    resumed = [e for e in read_events(RunStore.for_run(first_cfg)) if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 10  # the guardian actor saw the restart ...
    assert resumed[0]["steps_redone"] == resumed[0]["last_step_before"] + 1 - 10 <= 10  # ... and its cost
    assert 0 < resumed[0]["stalled_s"] < 300
    # Ray Train was told of the committed checkpoints through ray.train.report (pointers to store steps);
    # step 10 only if rank 0 reported between its commit and the crash.
    assert first["ray_checkpoint_step"] == 20 and 20 in first["ray_checkpoint_steps"]
    assert set(first["ray_checkpoint_steps"]) <= {10, 20}
    # The metrics on object storage (one object per flush): every step once, across the crash.
    history = read_history(open_storage(s3_url, s3_server.s3_config()).child("s3run"))
    assert [r["step"] for r in history.steps] == list(range(20))
    events = [(e["kind"], e.get("step"), e.get("attempt"), e.get("reason")) for e in history.events]
    assert [e["step"] for e in history.of_kind("resume")] == [10] and len(history.attempts) == 2, events
    assert {r["step"] for r in history.abandoned} <= set(range(10, 13))
    ray.shutdown()

    # (A hung worker on S3 is in the chaos soak's short schedule, tests/test_chaos.py.)
    keep_one = [*extra, "checkpoint.keep_last=1"]
    second = run(micro_config(dataset, s3_url, name="s3run", steps=30,
                              extra=[*keep_one, "faults=[{step: 12, kind: crash, rank: 1}]"]))
    assert second["step"] == 30
    assert second["metrics"]["start_step"] == 20  # resumed where it ended; the crash did not fire again
    assert store.steps() == [30]  # retention deleted the checkpoints Ray Train was told of earlier ...
    assert second["ray_checkpoint_step"] == 30 and {20, 30} <= set(second["ray_checkpoint_steps"])
    ray.shutdown()
    # ... yet Ray's run snapshot, which lists them, still loads: the job submitted once more resumes at 30.
    third = run(micro_config(dataset, s3_url, name="s3run", steps=30, extra=keep_one))
    assert third["step"] == 30 and third["ray_checkpoint_step"] == 30
    assert time.monotonic() - t0 < 600


def test_more_workers_than_the_cluster_can_ever_have_fails_fast(dataset, tmp_path, local_ray):
    from raytrainer.launch import run

    cfg = micro_config(dataset, str(tmp_path), name="toobig", steps=5,
                       extra=["parallel.min_workers=4", "parallel.max_workers=4", "parallel.cpus_per_worker=4",
                              "run.local_num_cpus=8"])
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="parallel.min_workers=4 needs 16 CPUs.*has 8 CPUs"):
        run(cfg)
    assert time.monotonic() - t0 < 60


def test_unreachable_storage_fails_before_training(dataset):
    from raytrainer.launch import run

    cfg = micro_config(dataset, "s3://nowhere/runs", name="nostorage", steps=5,
                       extra=["checkpoint.s3.endpoint_url=http://127.0.0.1:9", "checkpoint.s3.access_key_id=a",
                              "checkpoint.s3.secret_access_key=b"])
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="s3://nowhere/runs"):
        run(cfg)
    assert time.monotonic() - t0 < 30
    assert not ray.is_initialized()  # nothing was started


def _pretrain_cmd(dataset, storage, name, address, extra=()) -> list[str]:
    args = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", "tiny"]
    from runs import MICRO

    for item in [*MICRO, f"data.path={dataset}", f"checkpoint.storage={storage}", f"run.name={name}",
                 f"run.address={address}", *extra]:
        args += ["--set", item]
    return args


def _checkpoint_worlds(store: CheckpointStore) -> list[tuple[int, int]]:
    try:
        return [(c.step, c.world_size) for c in store.list() if c.complete]
    except Exception:
        return []


def _wait_for(predicate, timeout_s: float, what: str, proc=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job exited with {proc.returncode} while waiting for {what}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_elastic_shrink_when_a_node_leaves_and_grow_when_it_returns(dataset, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    slot = {"num_cpus": 2, "resources": {"trainer_slot": 1}}
    cluster.add_node(**slot)
    leaving = cluster.add_node(**slot)
    cluster.wait_for_nodes()
    store = CheckpointStore(str(tmp_path), "elastic")
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20", "PYTHONUNBUFFERED": "1"}
    log_file = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(
        _pretrain_cmd(dataset, tmp_path, "elastic", cluster.address,
                      ["train.steps=100000", "checkpoint.every_steps=5", "parallel.min_workers=1",
                       "parallel.max_workers=2", "parallel.elastic_resize_interval_s=5",
                       "parallel.extra_resources={trainer_slot: 1}", "parallel.max_failures=-1"]),
        stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )
    try:
        _wait_for(lambda: [s for s, w in _checkpoint_worlds(store) if w == 2], 180, "a 2-worker checkpoint", proc)
        cluster.remove_node(leaving)
        before = max(s for s, _ in _checkpoint_worlds(store))
        shrunk = _wait_for(lambda: [s for s, w in _checkpoint_worlds(store) if w == 1 and s > before], 180,
                           "a 1-worker checkpoint after the node left", proc)
        cluster.add_node(**slot)
        _wait_for(lambda: [s for s, w in _checkpoint_worlds(store) if w == 2 and s > max(shrunk)], 180,
                  "a 2-worker checkpoint after the node came back", proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
        cluster.shutdown()


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback with token authentication, as on a real cluster."""
    import shutil
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port, dashboard = _free_port(), _free_port()
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=8", "--include-dashboard=true",
                    f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_submission_runs_the_default_job(dataset, tmp_path, ray_head):
    """`ray job submit --working-dir .` against a token-authenticated head, as a user would."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    excludes = [".venv", ".git", "runs", "data", "bench/results", "**/__pycache__"]
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={ray_head}",
           f"--working-dir={REPO}", "--runtime-env-json", json.dumps({"excludes": excludes}), "--",
           *_pretrain_cmd(dataset, tmp_path, "submitted", "auto", ["train.steps=10"])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout.lower()
    store = CheckpointStore(str(tmp_path), "submitted")
    assert store.latest_complete() == 10 and store.verify(10, full=True).ok
    state = json.loads((tmp_path / "submitted" / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["cursor"]["step"] == 10

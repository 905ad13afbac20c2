"""The trainer on real Ray clusters: checkpoints on a real S3 server, resume, a killed worker, capacity and
storage preflight errors, and `ray job submit`. (Nodes leaving and joining: tests/test_elastic_node_loss.py.)"""

from __future__ import annotations

import json
import os
import re
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


def test_s3_checkpoints_survive_a_resubmission_and_a_crash(dataset, s3_server, s3_url, local_ray):
    """Two workers checkpoint to a real S3 server, keeping the preset's last two: retention deletes a checkpoint
    Ray Train was told of. The job submitted again with more steps resumes where it ended all the same (Ray's
    run snapshot still lists the deleted one); a worker process dies mid-run, and the run resumes from the
    last checkpoint by itself. (A hung worker on S3 is in the chaos soak's short schedule, test_chaos.py.)"""
    from raytrainer.launch import run

    extra = [*s3_overrides(s3_server), "parallel.min_workers=2", "parallel.max_workers=2",
             "guardian.step_timeout_s=20"]
    t0 = time.monotonic()
    first = run(micro_config(dataset, s3_url, name="s3run", steps=30, extra=extra))
    assert first["step"] == 30 and first["checkpoint"].startswith("s3://")
    store = CheckpointStore(s3_url, "s3run", s3_server.s3_config())
    listing = [(c.step, c.complete, c.world_size, c.committed_ranks, c.problems) for c in store.list()]
    assert store.steps() == [20, 30] and {c.world_size for c in store.list()} == {2}, listing
    assert store.verify(30, full=True).ok
    # Ray Train was told of every committed checkpoint through ray.train.report (pointers to store steps),
    # step 10 among them, which retention (checkpoint.keep_last=2) has deleted since.
    assert first["ray_checkpoint_step"] == 30 and set(first["ray_checkpoint_steps"]) == {10, 20, 30}
    # Submitted again to the same cluster, as `ray job submit` does on a long-lived one.

    second_cfg = micro_config(dataset, s3_url, name="s3run", steps=40,
                              extra=[*extra, "faults=[{step: 32, kind: crash, rank: 1}]"])
    second = run(second_cfg)
    assert second["step"] == 40
    assert second["metrics"]["start_step"] == 30  # the attempt after the crash began at the last checkpoint
    assert store.steps() == [30, 40]
    assert second["ray_checkpoint_step"] == 40 and {30, 40} <= set(second["ray_checkpoint_steps"])
    resumed = [e for e in read_events(RunStore.for_run(second_cfg)) if e["event"] == "resumed"]
    assert resumed and resumed[-1]["step"] == 30  # the guardian actor saw the restart ...
    assert resumed[-1]["steps_redone"] == resumed[-1]["last_step_before"] + 1 - 30 <= 10  # ... and its cost
    assert 0 < resumed[-1]["stalled_s"] < 300
    # The metrics on object storage (one object per flush): every step once, across the resubmission and the
    # crash.
    history = read_history(open_storage(s3_url, s3_server.s3_config()).child("s3run"))
    assert [r["step"] for r in history.steps] == list(range(40))
    events = [(e["kind"], e.get("step"), e.get("attempt"), e.get("reason")) for e in history.events]
    assert [e["step"] for e in history.of_kind("resume")][-1] == 30, events
    assert {r["step"] for r in history.abandoned} <= set(range(30, 33))
    assert time.monotonic() - t0 < 600


def test_a_tensor_parallel_run_resumes_after_a_killed_worker(dataset, tmp_path, local_ray):
    """Four workers in two tensor-parallel pairs (FSDP2 over the pairs); a worker process dies, and the run
    resumes from its last checkpoint on the same mesh at the data position it had there."""
    from raytrainer.launch import run

    cfg = micro_config(dataset, str(tmp_path / "runs"), name="tp", steps=14, extra=[
        "parallel.strategy=fsdp", "parallel.tp=2", "parallel.min_workers=4", "parallel.max_workers=4",
        "guardian.step_timeout_s=60", "faults=[{step: 12, kind: crash, rank: 3}]"])
    result = run(cfg)
    assert result["step"] == 14
    assert result["metrics"]["start_step"] == 10  # the attempt after the crash began at the last checkpoint
    history = read_history(open_storage(str(tmp_path / "runs")).child("tp"))
    assert [r["step"] for r in history.steps] == list(range(14))
    assert [e["world_size"] for e in history.of_kind("resume")] == [4]
    assert {r["step"] for r in history.abandoned} <= set(range(10, 13))
    # the data position came back with the checkpoint: every global batch once, in order
    assert [r["batch"] for r in history.steps] == list(range(14))
    assert history.steps[-1]["loss"] < history.steps[0]["loss"] - 0.5


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
    with pytest.raises(ConfigError, match="s3://nowhere/runs") as refused:  # a job's exit status 2
        run(cfg)
    assert isinstance(refused.value.__cause__, StorageError)
    assert time.monotonic() - t0 < 30
    assert not ray.is_initialized()  # nothing was started


def test_a_dataset_that_is_not_there_is_one_line_and_the_run_keeps_its_config(dataset, tmp_path, local_ray, capsys):
    from raytrainer.launch import run_job
    from raytrainer.report.document import CONFIG_FILE

    run_dir = tmp_path / "runs" / "r"
    (run_dir / "metrics").mkdir(parents=True)  # a run that has trained before
    (run_dir / CONFIG_FILE).write_text(json.dumps({"data": {"path": str(dataset)}}))
    typo = micro_config(dataset, str(tmp_path / "runs"), name="r", steps=5, extra=[f"data.path={dataset}x"])
    assert run_job(typo) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: {dataset}x/manifest.json: not found"), err
    assert "Traceback" not in err
    assert json.loads((run_dir / CONFIG_FILE).read_text()) == {"data": {"path": str(dataset)}}


def _pretrain_cmd(dataset, storage, name, address, extra=()) -> list[str]:
    """The job as a user runs it; `address` None: on a local Ray of its own, as `make pretrain` does."""
    args = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", "tiny"]
    from runs import MICRO

    joins = [f"run.address={address}"] if address else []
    for item in [*MICRO, f"data.path={dataset}", f"checkpoint.storage={storage}", f"run.name={name}", *joins, *extra]:
        args += ["--set", item]
    return args


def test_ctrl_c_pauses_the_run_at_a_committed_checkpoint_and_the_same_command_goes_on(dataset, tmp_path):
    """Ctrl-C on a terminal (SIGINT to the job's whole process group) while it trains with the tiny preset's
    checkpoint interval (25): every rank checkpoints at the end of its step, the job says where it paused and
    exits with 130, leaving a checkpoint at that step. Before, the run was aborted without a word and lost every
    step since its last scheduled checkpoint."""
    import signal

    cmd = _pretrain_cmd(dataset, tmp_path, "paused", None, ["checkpoint.every_steps=25", "train.log_every=1",
                                                            "eval.every_steps=null", "train.steps=100000"])
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    try:
        for line in job.stdout:
            out.append(line)
            if line.startswith("step ") and "loss" in line and int(line.split()[1].split("/")[0]) >= 3:
                os.killpg(job.pid, signal.SIGINT)
                break
        out += job.stdout.readlines()
        assert job.wait(timeout=300) == 130, "".join(out)[-4000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = "".join(out)
    assert "Ctrl-C: every rank checkpoints at the end of its step" in text, text[-4000:]
    (last,) = [line for line in out if line.startswith("paused: paused at step ")]
    step = int(last.split()[4])
    assert step >= 4 and "Run the same command again to go on from it." in last
    store = CheckpointStore(str(tmp_path), "paused")
    assert store.latest_complete() == step and store.verify(step, full=True).ok
    history = read_history(open_storage(str(tmp_path)).child("paused"))
    assert [e["kind"] for e in history.events][-1] == "paused"
    # Going on from the pause: test_job_submission_runs_the_default_job_and_ray_job_stop_pauses_it, end to end.


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
    address = f"http://127.0.0.1:{dashboard}"
    try:
        # The head takes submissions once its job agent has registered; Ray's own wait for it is 10 s, which a
        # loaded 2-core machine can exceed ("No available agent to submit job, please try again later").
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run([str(ray_bin), "job", "submit", f"--address={address}", "--no-wait", "--", "true"],
                                   env=env, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                break
            assert "No available agent" in probe.stdout + probe.stderr and time.monotonic() < deadline, (
                probe.stdout + probe.stderr)[-3000:]
            time.sleep(2)
        yield address
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_submission_runs_the_default_job_and_ray_job_stop_pauses_it(dataset, tmp_path, ray_head):
    """`ray job submit --working-dir .` against a token-authenticated head, as a user would, with the stop signal
    the README gives: `ray job stop` pauses the run at a committed checkpoint (Ctrl-C's path, with the tiny
    preset's checkpoint interval), and the job submitted again goes on from there and finishes."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    runtime_env = {"excludes": [".venv", ".git", "runs", "data", "bench/results", "**/__pycache__"],
                   "env_vars": {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "300"}}

    def ray_job(command: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([ray_bin, "job", command, f"--address={ray_head}", *args], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def submit(steps: int, *how: str) -> subprocess.CompletedProcess:
        job = _pretrain_cmd(dataset, tmp_path, "submitted", "auto",
                            [f"train.steps={steps}", "train.log_every=1", "checkpoint.every_steps=25"])
        return ray_job("submit", f"--working-dir={REPO}", "--runtime-env-json", json.dumps(runtime_env), *how, "--",
                       *job)

    assert submit(100_000, "--no-wait", "--submission-id=long").returncode == 0
    deadline, logs = time.monotonic() + 300, ""
    while time.monotonic() < deadline and not any(int(n) >= 3 for n in re.findall(r"^step +(\d+)/", logs, re.M)):
        time.sleep(2)
        logs = ray_job("logs", "long", timeout=60).stdout
    stopped = ray_job("stop", "long")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    logs = ray_job("logs", "long", timeout=60).stdout
    paused = re.search(r"^submitted: paused at step (\d+) ", logs, re.M)
    assert paused, logs[-4000:]
    step = int(paused[1])
    store = CheckpointStore(str(tmp_path), "submitted")
    assert store.latest_complete() == step and store.verify(step, full=True).ok

    done = submit(step + 3)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout.lower() and f"resumed at step {step} of {step + 3}" in done.stdout
    assert store.latest_complete() == step + 3 and store.verify(step + 3, full=True).ok
    state = json.loads((tmp_path / "submitted" / "checkpoints" / f"step_{step + 3:08d}" / "trainer_state.json"
                        ).read_text())
    assert state["step"] == step + 3 and state["cursor"]["step"] == step + 3

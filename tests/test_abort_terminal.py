"""A guardian abort ends the job, even with unlimited worker-group restarts: non-zero exit, the incident
report printed last, one worker-group start; resubmitting the aborted run is refused until the person says
how to go on (run.resume_after_abort), and then it goes on from its newest checkpoint."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from raytrainer.checkpoint import CheckpointStore
from raytrainer.fault.events import RunStore, read_events
from runs import MICRO, make_dataset, micro_config

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# Two bursts of NaN losses: the first rolls back (1 of 1 allowed), the second would need another rollback.
FAULTS = ["faults=[{step: 15, kind: nan_loss}, {step: 16, kind: nan_loss}, {step: 27, kind: nan_loss}, "
          "{step: 28, kind: nan_loss}]",
          "guardian.skips_before_rollback=1", "guardian.rollback_skip_batches=2", "guardian.max_rollbacks=1",
          "parallel.min_workers=1", "parallel.max_workers=1", "parallel.max_failures=-1"]
STARTS = re.compile(r"^(starting|resumed) at step (\d+)", re.MULTILINE)  # the driver's view of each start


@pytest.fixture
def cluster():
    """A Ray cluster of the test's own (a bare `ray.init()` would join whatever cluster `ray start` left), with
    its own dashboard: Ray Train's placement-group cleaner asks the state API whether the controller lives,
    and without a dashboard that API falls back to 127.0.0.1:8265, where another cluster may answer."""
    from ray.cluster_utils import Cluster

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 8, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    try:
        yield cluster
    finally:
        cluster.shutdown()


def pretrain(cluster, dataset: Path, storage: Path, log: Path, extra: list[str] = ()) -> tuple[int, str]:
    """jobs/pretrain.py as a user runs it, against the test's cluster; returns its exit status and output."""
    cmd = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", "tiny"]
    for item in [*MICRO, f"data.path={dataset}", f"checkpoint.storage={storage}", "run.name=aborted",
                 f"run.address={cluster.address}", "train.steps=35", *FAULTS, *extra]:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30", PYTHONUNBUFFERED="1")
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=500)
    return done.returncode, log.read_text()


def test_an_abort_ends_the_job_and_a_resubmission_needs_to_be_told_how_to_go_on(tmp_path, cluster):
    dataset = make_dataset(tmp_path)
    storage = tmp_path / "runs"
    guardian_store = RunStore.for_run(micro_config(dataset, str(storage), name="aborted"))

    code, output = pretrain(cluster, dataset, storage, tmp_path / "first.log")
    tail = output[-3000:]
    assert code == 3, tail
    aborts = [e for e in read_events(guardian_store) if e["event"] == "abort"]
    assert len(aborts) == 1 and aborts[0]["step"] > 16, tail
    report = aborts[0]["reason"]
    assert "guardian.max_rollbacks=1 rollbacks are used up" in report
    assert output.rstrip().endswith(report), tail  # the incident report is the last thing printed
    # Ray did not restart the worker group: it started once, although parallel.max_failures=-1.
    assert [m.groups() for m in STARTS.finditer(output)] == [("starting", "0")], tail

    code, output = pretrain(cluster, dataset, storage, tmp_path / "second.log")
    assert code == 2, output[-3000:]
    last = output.rstrip().splitlines()
    refusal = "\n".join(last[-3:])
    assert last[-3].startswith("error: run 'aborted' was aborted by its guardian"), refusal
    assert report.splitlines()[0] in refusal and "--set run.resume_after_abort=true" in refusal
    assert "optim.lr (now 0.003)" in refusal and "schedule.warmup_steps (now 5)" in refusal
    assert not STARTS.search(output)  # refused before any worker started

    newest = CheckpointStore(str(storage), "aborted").latest_complete()
    code, output = pretrain(cluster, dataset, storage, tmp_path / "third.log",
                            ["run.resume_after_abort=true", "optim.lr=1e-3"])
    assert code == 0, output[-3000:]
    assert [m.groups() for m in STARTS.finditer(output)] == [("resumed", str(newest))]
    assert "done: aborted at step 35" in output
    resumed = [e for e in read_events(guardian_store) if e["event"] == "resumed_after_abort"]
    assert len(resumed) == 1 and "optim.lr=0.001" in resumed[0]["reason"]

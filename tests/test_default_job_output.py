"""The default job's output is for the person: at most 40 lines for 100 steps, none of them Ray's chatter,
each event once (one line per checkpoint, from the driver), and the run leaves its metrics and report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs import MICRO_MODEL, make_dataset

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

RAY_CHATTER = ("PlacementGroupCleaner", "Reporting training result", "registers for logging", "Progress bars",
               "RayTrainWorker pid", "Started a local Ray instance", "StorageContext", "Attempting to start")


def test_the_default_job_prints_at_most_40_lines_all_of_them_ours(tmp_path):
    dataset = make_dataset(tmp_path)
    cmd = [sys.executable, str(REPO / "jobs" / "pretrain.py")]
    # The tiny preset as shipped (100 steps, log_every 10, a checkpoint and an evaluation every 25, 1..2
    # workers, a local Ray started by the job); only the model and batch are shrunk.
    for item in [*MICRO_MODEL, f"data.path={dataset}", f"checkpoint.storage={tmp_path / 'runs'}"]:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=500)
    output = done.stdout + done.stderr
    lines = output.splitlines()
    assert done.returncode == 0, output[-3000:]
    assert len(lines) <= 40, "\n".join(lines)
    chatter = [line for line in lines if any(c in line for c in RAY_CHATTER)]
    assert chatter == [], "\n".join(lines)
    checkpoints = [line for line in lines if line.startswith("checkpoint at step")]
    assert [line.split()[3] for line in checkpoints] == ["25", "50", "75", "100"]
    steps = [line for line in lines if line.startswith("step ") and "  loss " in line]
    assert [line.split()[1] for line in steps] == [f"{s}/100" for s in (*range(0, 100, 10), 99)]
    assert sum(" val loss " in line for line in lines) == 4
    assert done.stdout.splitlines()[-1].startswith("done: tiny at step 100")  # stderr holds the log lines
    run = tmp_path / "runs" / "tiny"
    assert list((run / "metrics").glob("*.jsonl")) and list((run / "tensorboard").glob("events.out.tfevents.*"))
    report = run / "report" / "report.html"
    assert report.exists() and report.stat().st_size > 20_000, "\n".join(lines)

"""Abrupt node loss in an elastic run: seconds from the loss to the first step on the smaller group.

A local Ray cluster (ray.cluster_utils.Cluster: a head with 4 CPUs, two worker nodes with 2 CPUs and one
`trainer_slot` each) runs jobs/pretrain.py with the micro model (tests/runs.py), parallel.min_workers=1,
parallel.max_workers=2, a checkpoint every --every steps, and the default parallel.worker_start_timeout_s.
Once a 2-worker checkpoint is committed, one worker node vanishes: its raylet and every process on it are
SIGKILLed at once, so Ray learns of the loss only from dropped connections and its health checks. The run
must notice, size the group again from the nodes still there (one), start it, reload the checkpoint and
step. The guardian actor (on the head) logs a `resumed` event with the wall time of the first step after
the restart:

  node_loss_to_first_step_s  from the SIGKILL to that first step: failure detection + re-sizing +
                             worker-group start + checkpoint load + one step
  stalled_s                  from the last step before the loss to the same first step
  steps_redone               steps between the checkpoint and the loss, trained again

    .venv/bin/python bench/node_loss.py [--rounds 2] [--every 5]

Last line: `node_loss_to_first_step_s: <median>`; JSON in bench/results/node_loss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

RESULTS = Path(__file__).resolve().parent / "results"


def one_round(dataset: Path, work: Path, name: str, every: int) -> dict:
    from ray.cluster_utils import Cluster
    from test_elastic_node_loss import (
        SLOT,
        START_TIMEOUT_ENV,
        checkpoint_worlds,
        pick_doomed,
        resumes_after,
        start_job,
        stop_job,
        vanish,
        wait_for,
    )

    from raytrainer.checkpoint import CheckpointStore

    os.environ.pop(START_TIMEOUT_ENV, None)  # the cluster's processes inherit this: keep Ray's default path
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    proc = None
    log = work / f"{name}.log"
    try:
        nodes = [cluster.add_node(**SLOT), cluster.add_node(**SLOT)]
        cluster.wait_for_nodes()
        store = CheckpointStore(str(work), name)
        proc = start_job(cluster, dataset, work, name, log, [f"checkpoint.every_steps={every}"])
        wait_for(lambda: [s for s, w in checkpoint_worlds(store) if w == 2], 300, "a 2-worker checkpoint", proc, log)
        before = max(s for s, _ in checkpoint_worlds(store))
        doomed = pick_doomed(nodes)  # not the guardian's node: its events time the recovery
        killed_at = time.time()
        vanish(doomed)
        shrunk = wait_for(lambda: [s for s, w in checkpoint_worlds(store) if w == 1 and s > before], 900,
                          "a 1-worker checkpoint after the node vanished", proc, log)
        seen_s = time.time() - killed_at
        resumed = wait_for(lambda: resumes_after(work / name, killed_at), 60,
                           "the guardian's record of the first step after the restart", proc, log)[0]
        return {"node_loss_to_first_step_s": round(resumed["time"] - killed_at, 2),
                "stalled_s": resumed["stalled_s"], "steps_redone": resumed["steps_redone"],
                "resumed_at": resumed["step"], "last_step_before": resumed["last_step_before"],
                "first_1_worker_checkpoint": min(shrunk), "first_1_worker_checkpoint_seen_s": round(seen_s, 2)}
    finally:
        if proc is not None:
            stop_job(proc)
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()

    from runs import make_dataset

    work = Path(tempfile.mkdtemp(prefix="node-loss-"))
    rounds = []
    try:
        dataset = make_dataset(work)
        for r in range(args.rounds):
            result = one_round(dataset, work, f"nodeloss-{r}", args.every)
            rounds.append(result)
            print(f"round {r}: first step on 1 worker {result['node_loss_to_first_step_s']:.1f}s after the node "
                  f"vanished (stalled {result['stalled_s']:.1f}s, redid {result['steps_redone']} steps, resumed at "
                  f"{result['resumed_at']}); 1-worker checkpoint {result['first_1_worker_checkpoint']} seen after "
                  f"{result['first_1_worker_checkpoint_seen_s']:.1f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "name": "node_loss",
        "config": {"model": "micro (tests/runs.py)", "workers": "1..2", "checkpoint_every": args.every,
                   "cluster": "ray.cluster_utils.Cluster: head 4 CPUs + 2 nodes of 2 CPUs, 1 trainer_slot each",
                   "loss": "SIGKILL of one worker node's raylet and every process on it",
                   "worker_start_timeout_s": "default (600)"},
        "rounds": rounds,
        "node_loss_to_first_step_s_median": round(statistics.median(x["node_loss_to_first_step_s"] for x in rounds), 2),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "node_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"node_loss_to_first_step_s: {result['node_loss_to_first_step_s_median']:.1f}")


if __name__ == "__main__":
    main()

"""Recovery from a killed worker on a local Ray cluster: seconds without progress and steps done again.

Two Ray Train workers train the micro model (tests/runs.py) with checkpoints every --every steps to a
SeaweedFS S3 server started here. At --crash-at, rank 1's process exits at once (`os._exit`, as if its node
died). Ray Train notices, restarts the worker group, every rank reloads the last checkpoint, and training
goes on. The guardian actor outlives the restart and logs a `resumed` event at the first step after it:

  stalled_s     from the last step finished before the crash to the first step finished after it:
                failure detection + worker-group restart + checkpoint download and load + one step
  steps_redone  steps between the checkpoint and the crash, trained again (at most the interval)

    .venv/bin/python bench/recovery_time.py [--rounds 2] [--every 10] [--crash-at 17]

Last line: `recovery_s: <median stalled_s>`; JSON in bench/results/recovery_time.json.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--crash-at", type=int, default=17)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    import ray

    from raytrainer.fault.events import RunStore, read_events
    from raytrainer.launch import run
    from raytrainer.storage_server import LocalS3Server
    from runs import make_dataset, micro_config

    work = Path(tempfile.mkdtemp(prefix="recovery-"))
    server = LocalS3Server(work / "s3").start()
    rounds = []
    try:
        dataset = make_dataset(work)
        s3 = server.s3_config()
        for r in range(args.rounds):
            cfg = micro_config(dataset, server.url("recovery"), name=f"crash-{r}", steps=args.steps, extra=[
                f"checkpoint.s3.endpoint_url={s3.endpoint_url}", f"checkpoint.s3.access_key_id={server.access_key}",
                f"checkpoint.s3.secret_access_key={server.secret_key}",
                "parallel.min_workers=2", "parallel.max_workers=2", f"checkpoint.every_steps={args.every}",
                f"faults=[{{step: {args.crash_at}, kind: crash, rank: 1}}]",
            ])
            started = time.monotonic()
            out = run(cfg)
            wall = time.monotonic() - started
            ray.shutdown()
            resumed = [e for e in read_events(RunStore.for_run(cfg)) if e["event"] == "resumed"]
            if out["step"] != args.steps or len(resumed) != 1:
                raise SystemExit(f"round {r}: run ended at step {out['step']} with {len(resumed)} resumed "
                                 "events; expected one recovery and a finished run")
            event = resumed[0]
            rounds.append({"stalled_s": event["stalled_s"], "steps_redone": event["steps_redone"],
                           "resumed_at": event["step"], "last_step_before": event["last_step_before"],
                           "run_wall_s": wall})
            print(f"round {r}: stalled {event['stalled_s']:.1f}s, redid {event['steps_redone']} steps "
                  f"(resumed at {event['step']} after step {event['last_step_before']}), run {wall:.0f}s",
                  flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "name": "recovery_time",
        "config": {"model": "micro (tests/runs.py)", "workers": 2, "checkpoint_every": args.every,
                   "crash_at": args.crash_at, "storage": "SeaweedFS S3 on loopback"},
        "rounds": rounds,
        "recovery_s_median": statistics.median(x["stalled_s"] for x in rounds),
        "steps_redone_max": max(x["steps_redone"] for x in rounds),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery_time.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"steps_redone_max: {result['steps_redone_max']} (checkpoint interval {args.every})")
    print(f"recovery_s: {result['recovery_s_median']:.1f}")


if __name__ == "__main__":
    main()

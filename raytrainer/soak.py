"""The chaos soak: one job run twice on the local Ray cluster, clean and under a seeded schedule of every fault
kind (raytrainer.fault.chaos), with checkpoints on a local S3 server that the schedule takes down once, and
the scorecard of the two. bench/chaos.py prints it; a test runs a short one.

    card, faults = soak("tiny", overrides, steps=300, seed=0, workdir="/tmp/chaos")
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raytrainer.fault.chaos import Scorecard, schedule, scorecard

# A hung worker waits for the step watchdog: a chaos run is not the place to wait the default 10 minutes.
CHAOS_OVERRIDES = ["guardian.step_timeout_s=30", "parallel.max_failures=10"]
OUTAGE_S = 10.0


def soak(preset: str, overrides: list[str], steps: int, seed: int, workdir: str, first: int | None = None,
         world_size: int = 2) -> tuple[Scorecard, list[dict], dict]:
    """Run the clean job and the chaos job; returns the scorecard, the faults injected and the timings."""
    import ray

    from raytrainer.config import load_config
    from raytrainer.fault.events import RunStore, read_events
    from raytrainer.fault.outage import start_outage_switch
    from raytrainer.launch import init_ray, run
    from raytrainer.metrics.history import read_history
    from raytrainer.storage import open_storage

    base = [*CHAOS_OVERRIDES, *overrides, f"train.steps={steps}", f"parallel.min_workers={world_size}",
            f"parallel.max_workers={world_size}"]
    probe = load_config(preset, base)
    every = probe.checkpoint.every_steps
    start = first if first is not None else probe.guardian.warmup_exempt_steps + probe.guardian.min_window + 2
    faults = schedule(seed, steps, world_size, every, start)
    init_ray(probe)
    switch = start_outage_switch(f"chaos-{seed}", str(Path(workdir) / "s3"), seconds=OUTAGE_S)
    try:
        info = ray.get(switch.info.remote())
        s3 = [f"checkpoint.s3.endpoint_url={info['endpoint_url']}", "checkpoint.s3.region=us-east-1",
              f"checkpoint.s3.access_key_id={info['access_key']}",
              f"checkpoint.s3.secret_access_key={info['secret_key']}",
              f"checkpoint.storage={info['url']}/soak-{int(time.time())}"]
        clean_cfg = load_config(preset, [*base, *s3, f"run.name=clean-{seed}"])
        chaos_cfg = load_config(preset, [*base, *s3, f"run.name=chaos-{seed}", f"faults={json.dumps(faults)}"])
        timings = {}
        for cfg in (clean_cfg, chaos_cfg):
            t0 = time.monotonic()
            run(cfg)
            timings[cfg.run.name] = time.monotonic() - t0
        root = open_storage(clean_cfg.checkpoint.storage, clean_cfg.checkpoint.s3)
        card = scorecard(faults, read_history(root.child(chaos_cfg.run.name)),
                         read_events(RunStore.for_run(chaos_cfg)), read_history(root.child(clean_cfg.run.name)), steps,
                         every)
        card.notes.append(f"wall time: clean {timings[clean_cfg.run.name]:.0f} s, "
                          f"chaos {timings[chaos_cfg.run.name]:.0f} s")
        return card, faults, timings
    finally:
        ray.get(switch.shutdown.remote())

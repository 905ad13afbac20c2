"""Guardian detection latency per fault, and rollback time vs a plain checkpoint load of the same size.

In-process micro runs (no Ray): each fault is injected at a known step and the bench reads, from the
run's history, the step of the guardian's first intervention. shuffle_labels runs on the patterned dataset
of tests/runs.py (on the sample corpus the micro model is still near unigram statistics at that step,
which shuffled labels keep, so there is nothing to see). The rollback is timed inside the loop
(reload + data cursor rebuild) and compared with loading the same checkpoint into a fresh engine, over
--repeats runs (medians reported); --rollback-only skips the detection runs (JSON then in
bench/results/rollback_time.json).

    .venv/bin/python bench/guardian_response.py [--rollback-only] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from raytrainer.fault.guardian import Guardian  # noqa: E402
from raytrainer.train.loop import Trainer, WorkerEnv  # noqa: E402
from raytrainer.train.ray_entry import build_trainer  # noqa: E402
from runs import make_dataset, make_patterned_dataset, micro_config  # noqa: E402

INJECT_AT = 25
FAULTS = {"nan_loss": [], "grad_explode": [], "loss_spike": [], "shuffle_labels": []}


def run(cfg) -> tuple[list[dict], Trainer]:
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    return trainer.fit()["history"], trainer


def time_rollback(cfg) -> tuple[float, float]:
    """(in-place rollback, plain load of the same checkpoint into a fresh trainer), in seconds."""
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    original = trainer.rollback
    timings = []

    def timed(step, decision):
        t0 = time.perf_counter()
        out = original(step, decision)
        timings.append(time.perf_counter() - t0)
        return out

    trainer.rollback = timed
    trainer.fit()
    fresh = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    t0 = time.perf_counter()
    fresh.checkpoints.load(20, fresh.engine)
    return timings[0], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollback-only", action="store_true", help="skip the detection-latency runs")
    parser.add_argument("--repeats", type=int, default=1, help="rollback runs (medians reported)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="rt-guardian-"))
    results: dict = {"inject_at_step": INJECT_AT, "detection_latency_steps": {}}
    try:
        dataset = make_dataset(tmp)
        patterned = make_patterned_dataset(tmp)
        for kind in [] if args.rollback_only else FAULTS:
            data = patterned if kind == "shuffle_labels" else dataset
            cfg = micro_config(data, str(tmp / kind), name=kind, steps=35,
                               extra=[f"faults=[{{step: {INJECT_AT}, kind: {kind}}}]"])
            history, _ = run(cfg)
            hits = [h["step"] for h in history if h.get("action") not in (None, "continue")]
            results["detection_latency_steps"][kind] = (hits[0] - INJECT_AT) if hits else None

        pairs = []
        for i in range(args.repeats):
            cfg = micro_config(dataset, str(tmp / f"rb{i}"), name="rb", steps=35,
                               extra=[f"faults=[{{step: {INJECT_AT}, kind: loss_spike}}]",
                                      "guardian.skips_before_rollback=0",
                                      # the rollback target must outlive retention: the plain load reads it later
                                      "checkpoint.keep_last=100"])
            pairs.append(time_rollback(cfg))
        rollback = statistics.median(r for r, _ in pairs)
        plain = statistics.median(p for _, p in pairs)
        results.update(rollback_s=rollback, plain_load_s=plain, rollback_vs_load=rollback / plain,
                       rollback_runs=[{"rollback_s": r, "plain_load_s": p} for r, p in pairs])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    # the rollback-only figure goes to a file of its own: it must not overwrite the detection latencies
    name = "rollback_time.json" if args.rollback_only else "guardian_response.json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"rollback_vs_load: {results['rollback_vs_load']:.2f}")


if __name__ == "__main__":
    main()

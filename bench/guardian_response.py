"""Guardian detection latency per fault, and rollback time vs a plain checkpoint load of the same size.

In-process micro runs (no Ray): each fault is injected at a known step and the bench reads, from the
run's history, the step of the guardian's first intervention. shuffle_labels runs on the patterned dataset
of tests/runs.py (on the sample corpus the micro model is still near unigram statistics at that step,
which shuffled labels keep, so there is nothing to see). The rollback is timed inside the loop
(reload + data cursor rebuild) and compared with loading the same checkpoint into a fresh engine.

    .venv/bin/python bench/guardian_response.py
"""

from __future__ import annotations

import json
import shutil
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


def main() -> None:
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="rt-guardian-"))
    results: dict = {"inject_at_step": INJECT_AT, "detection_latency_steps": {}}
    try:
        dataset = make_dataset(tmp)
        patterned = make_patterned_dataset(tmp)
        for kind in FAULTS:
            data = patterned if kind == "shuffle_labels" else dataset
            cfg = micro_config(data, str(tmp / kind), name=kind, steps=35,
                               extra=[f"faults=[{{step: {INJECT_AT}, kind: {kind}}}]"])
            history, _ = run(cfg)
            hits = [h["step"] for h in history if h.get("action") not in (None, "continue")]
            results["detection_latency_steps"][kind] = (hits[0] - INJECT_AT) if hits else None

        cfg = micro_config(dataset, str(tmp / "rb"), name="rb", steps=35,
                           extra=[f"faults=[{{step: {INJECT_AT}, kind: loss_spike}}]",
                                  "guardian.skips_before_rollback=0"])
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
        plain = time.perf_counter() - t0
        results.update(rollback_s=timings[0], plain_load_s=plain, rollback_vs_load=timings[0] / plain)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "guardian_response.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"rollback_vs_load: {results['rollback_vs_load']:.2f}")


if __name__ == "__main__":
    main()

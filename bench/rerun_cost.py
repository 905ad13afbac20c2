"""What a guardian rerun costs, and what it costs a healthy step to be able to rerun.

In process, one rank, the `tiny` preset's model and batch on the sample corpus: the same steps are timed
as the loop runs them (forward_backward + apply), then with a rerun in between (forward_backward +
recompute + apply). A healthy step only keeps its RNG state (to recompute from it); that copy is timed on
its own. Medians over --steps steps, measured side by side in one process.

    .venv/bin/python bench/rerun_cost.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from organic_spikes import dataset_path  # noqa: E402

from raytrainer.config import load_config  # noqa: E402
from raytrainer.train.engine import _rng_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import build_trainer

    with tempfile.TemporaryDirectory(prefix="rt-rerun-") as tmp:
        cfg = load_config("tiny", [f"data.path={dataset_path()}", f"checkpoint.storage={tmp}",
                                   "guardian.enabled=false", "eval.every_steps=null", "metrics.report=false"])
        trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"))
        trainer.feed = trainer.feed_factory(None)
        engine = trainer.engine
        plain, rerun = [], []
        for step in range(2 * args.steps + 1):
            micro_batches = trainer.feed.next_step()
            t0 = time.perf_counter()
            engine.forward_backward(micro_batches, step)
            if step % 2 == 0 and step > 0:
                engine.recompute(micro_batches, step)
            engine.apply()
            elapsed = time.perf_counter() - t0
            if step > 0:  # the first step warms up
                (rerun if step % 2 == 0 else plain).append(elapsed)
        t0 = time.perf_counter()
        for _ in range(1000):
            _rng_state(torch.device("cpu"))
        keep_rng_s = (time.perf_counter() - t0) / 1000
        trainer.feed.close()
    step_s, with_rerun_s = statistics.median(plain), statistics.median(rerun)
    result = {"step_s": step_s, "step_with_rerun_s": with_rerun_s, "rerun_vs_step": (with_rerun_s - step_s) / step_s,
              "rng_copy_s": keep_rng_s, "rng_copy_vs_step": keep_rng_s / step_s, "steps": args.steps}
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "rerun_cost.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

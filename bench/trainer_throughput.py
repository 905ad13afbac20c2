"""Trainer throughput on this machine: the bare step engine vs the Ray trainer on 1 worker, and 1 vs 2 workers.

The same tiny model, data and global batch for all three; each figure is the median tokens/s over the
last steps of its run (wall time between steps: data, guardian round trip and optimizer step included).

    .venv/bin/python bench/trainer_throughput.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from raytrainer.config import load_config
from raytrainer.fault.guardian import Guardian
from raytrainer.launch import run
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer


def config(storage: str, name: str, steps: int, workers: int, threads: int):
    return load_config("tiny", [f"train.steps={steps}", f"checkpoint.storage={storage}", f"run.name={name}",
                                f"parallel.min_workers={workers}", f"parallel.max_workers={workers}",
                                "checkpoint.every_steps=1000", f"train.threads_per_worker={threads}"])


def median_rate(history: list[dict]) -> float:
    rates = sorted(h["tokens_per_s"] for h in history[len(history) // 3:] if "tokens_per_s" in h)
    return rates[len(rates) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="rt-bench-")
    try:
        cfg = config(tmp, "engine", args.steps, 1, 2)
        torch.set_num_threads(2)
        trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
        engine_rate = median_rate(trainer.fit()["history"])
        results = {"engine_1proc_tokens_per_s": engine_rate}
        for workers in (1, 2):
            t0 = time.monotonic()
            out = run(config(tmp, f"ray{workers}", args.steps, workers, 2 // workers))
            ray.shutdown()
            results[f"trainer_{workers}w_tokens_per_s"] = out["metrics"]["median_tokens_per_s"]
            results[f"trainer_{workers}w_wall_s"] = time.monotonic() - t0
        results["trainer_vs_engine"] = results["trainer_1w_tokens_per_s"] / engine_rate
        results["two_vs_one_worker"] = results["trainer_2w_tokens_per_s"] / results["trainer_1w_tokens_per_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "trainer_throughput.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"trainer_vs_engine: {results['trainer_vs_engine']:.3f}")


if __name__ == "__main__":
    main()

"""Trainer throughput on this machine: the bare step engine vs the Ray trainer on 1 worker, and 1 vs 2 workers.

The same tiny model, data and global batch for all three; each figure is the median tokens/s over the
last two thirds of its run (wall time between steps: data, guardian round trip and optimizer step
included). The bare engine (the same Trainer loop in this process, no Ray) runs before and after the Ray
runs, and its mean is the reference, so drift in the machine's speed during the bench cancels out.

Each process trains with --threads torch threads (default 1, and 1 per worker with 2 workers): on a 2-core
machine, two threads would share their cores with Ray's own daemons and Ray Data tasks, and every
preemption stalls both threads at their next sync point, so the figure would measure the size of this
machine rather than what Ray costs the training process.

    .venv/bin/python bench/trainer_throughput.py [--steps 40] [--threads 1]
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


def engine_rate(storage: str, name: str, steps: int, threads: int) -> float:
    cfg = config(storage, name, steps, 1, threads)
    torch.set_num_threads(threads)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    return median_rate(trainer.fit()["history"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the 1-worker runs")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="rt-bench-")
    try:
        results = {"engine_before_tokens_per_s": engine_rate(tmp, "engine-before", args.steps, args.threads)}
        for workers in (1, 2):
            t0 = time.monotonic()
            out = run(config(tmp, f"ray{workers}", args.steps, workers, 1 if workers > 1 else args.threads))
            ray.shutdown()
            results[f"trainer_{workers}w_tokens_per_s"] = out["metrics"]["median_tokens_per_s"]
            results[f"trainer_{workers}w_wall_s"] = time.monotonic() - t0
        results["engine_after_tokens_per_s"] = engine_rate(tmp, "engine-after", args.steps, args.threads)
        engine = (results["engine_before_tokens_per_s"] + results["engine_after_tokens_per_s"]) / 2
        results["engine_1proc_tokens_per_s"] = engine
        results["torch_threads"] = args.threads
        results["trainer_vs_engine"] = results["trainer_1w_tokens_per_s"] / engine
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

"""What metrics on record cost a training step, and what an evaluation costs next to one.

In-process (no Ray), the tiny preset as shipped (model, batch, threads; 1 worker): steps alternate, in
pairs, between a trainer whose rank 0 records through every default sink (JSON lines + TensorBoard, flushed
every metrics.flush_every_s in the background) and the same trainer with the recorder swapped for one that
keeps nothing. The cost is the extra time per step inside `record` plus the recorder's `log` (the training
thread's share: the writes are on the recorder's thread) relative to the median step; the sink writes
themselves are timed too. The evaluation ratio is one `evaluate` (eval.batches of validation rows) over the
median training step.

    .venv/bin/python bench/metrics_cost.py [--steps 40]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from raytrainer.config import load_config  # noqa: E402
from raytrainer.fault.guardian import Guardian  # noqa: E402
from raytrainer.metrics.recorder import NullRecorder  # noqa: E402
from raytrainer.train.loop import WorkerEnv  # noqa: E402
from raytrainer.train.ray_entry import build_trainer  # noqa: E402
from runs import make_dataset  # noqa: E402


class Timed:
    """Wraps a recorder: the time its `log` and the sinks' writes take."""

    def __init__(self, inner):
        self.inner = inner
        self.log_s: list[float] = []
        self.attempt = getattr(inner, "attempt", "")
        for q in getattr(inner, "_queues", []):
            write = q.sink.write
            q.sink.write = self._timed_write(write)
        self.write_s: list[float] = []

    def _timed_write(self, write):
        def timed(records):
            t0 = time.perf_counter()
            write(records)
            self.write_s.append(time.perf_counter() - t0)
        return timed

    def log(self, kind, **fields):
        t0 = time.perf_counter()
        out = self.inner.log(kind, **fields)
        self.log_s.append(time.perf_counter() - t0)
        return out

    def flush(self, timeout_s=None):
        return self.inner.flush(timeout_s)

    def close(self, timeout_s=30.0):
        self.inner.close(timeout_s)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="metrics-cost-"))
    dataset = make_dataset(work)
    cfg = load_config("tiny", [f"data.path={dataset}", f"checkpoint.storage={work / 'runs'}",
                               f"train.steps={args.steps * 2 + 10}", "checkpoint.every_steps=100000",
                               "metrics.flush_every_s=1"])
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    recording, null = Timed(trainer.recorder), Timed(NullRecorder())
    step = trainer.restore()
    for _ in range(3):  # warm up
        step = trainer.train_step(step)
    times = {"recorded": [], "null": []}
    record_s = {"recorded": [], "null": []}
    original_record = trainer.record

    for i in range(args.steps * 2):
        mode = "recorded" if i % 2 == 0 else "null"
        trainer.recorder = recording if mode == "recorded" else null
        spent = []

        def timed_record(*a, _spent=spent, **k):
            t0 = time.perf_counter()
            original_record(*a, **k)
            _spent.append(time.perf_counter() - t0)

        trainer.record = timed_record
        t0 = time.perf_counter()
        step = trainer.train_step(step)
        times[mode].append(time.perf_counter() - t0)
        record_s[mode].append(sum(spent))
    trainer.recorder = recording
    trainer.recorder.flush(timeout_s=30)
    median_step = statistics.median(times["null"])
    extra = statistics.median(record_s["recorded"]) - statistics.median(record_s["null"])
    eval_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        trainer.engine.evaluate(trainer.validation.batches)
        eval_times.append(time.perf_counter() - t0)
    recording.close()
    result = {
        "median_step_s": median_step,
        "median_step_recorded_s": statistics.median(times["recorded"]),
        "record_extra_s": extra,
        "recorder_log_median_s": statistics.median(recording.log_s),
        "sink_write_median_s": statistics.median(recording.write_s) if recording.write_s else None,
        "sink_writes": len(recording.write_s),
        "metrics_cost_ratio": max(extra, 0.0) / median_step,
        # The sinks' writes run on the recorder's thread, but on two cores they still take CPU from training.
        "background_write_ratio": sum(recording.write_s) / (args.steps * 2) / median_step,
        "eval_s": statistics.median(eval_times),
        "eval_batches": len(trainer.validation.batches),
        "eval_tokens": trainer.validation.tokens,
        "eval_vs_step": statistics.median(eval_times) / median_step,
    }
    out = Path(__file__).resolve().parent / "results" / "metrics_cost.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"metrics_cost_ratio: {result['metrics_cost_ratio']:.2e} (background writes "
          f"{result['background_write_ratio']:.2e})")
    print(f"eval_vs_step: {result['eval_vs_step']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

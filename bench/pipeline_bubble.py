"""The pipeline bubble of each schedule, measured through the trainer's own pipeline, against the formula.

The model has 8 blocks whose every forward takes a fixed --forward-ms and backward --backward-ms (sleeps: the
machine's 2 cores do not limit p = 4 stages, and the work is exactly known). One process trains m micro-batches
through all 8 blocks (T1: every block's work, plus the step's own fixed costs); p gloo processes train the same
through raytrainer's pipeline (PipelineStrategy + StepEngine.forward_backward), 8/p blocks each (Tp). A perfect
pipeline would take T1 / p; the rest is the bubble:

    measured bubble = 1 - (T1 / p) / Tp
    formula: (p - 1) / (m + p - 1) for GPipe and 1F1B, (p - 1) / (v·m + p - 1) for interleaved 1F1B (v stages a rank)

for m micro-batches (a replica's accumulation steps). The measured figure also holds the messages between
stages and the step's collectives, which one process does not pay. Writes bench/results/pipeline_bubble.json.

    .venv/bin/python bench/pipeline_bubble.py [--steps 2] [--forward-ms 20] [--backward-ms 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from raytrainer.config import load_config  # noqa: E402
from strategy_harness import load_result, save_result, spawn  # noqa: E402

N_LAYERS = 8
SEQ = 16
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2))
MICRO_BATCHES = (4, 8, 16)


def config(pp: int, schedule: str, per_rank: int, m: int):
    return load_config(None, [
        "model.vocab_size=64", "model.d_model=32", f"model.n_layers={N_LAYERS}", "model.n_heads=2",
        "model.multiple_of=32", f"model.max_seq_len={SEQ}", "model.tie_embeddings=false", "precision.dtype=fp32",
        f"train.seq_len={SEQ}", f"train.global_batch_tokens={SEQ * m}", "train.micro_batch_size=1",
        f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}", f"parallel.pp_stages_per_rank={per_rank}",
        f"parallel.min_workers={pp}", f"parallel.max_workers={pp}"])


def slow_blocks(module: torch.nn.Module, forward_s: float, backward_s: float) -> None:
    """Every block's forward sleeps forward_s, and its backward backward_s (a hook on its output's gradient)."""

    def on_forward(block, args, output):
        time.sleep(forward_s)
        if output.requires_grad:
            output.register_hook(lambda grad: time.sleep(backward_s))
        return output

    blocks = module.layers.values() if isinstance(module.layers, torch.nn.ModuleDict) else module.layers
    for block in blocks:
        block.register_forward_hook(on_forward)


def step_seconds(cfg, rank: int, world_size: int, steps: int, forward_s: float, backward_s: float) -> float:
    """The median time of a step's forwards and backwards (the first step, which builds the schedule, untimed)."""
    from raytrainer.model import Transformer
    from raytrainer.train.engine import StepEngine
    from raytrainer.train.strategies import build_strategy

    torch.manual_seed(0)
    strategy = build_strategy(cfg, Transformer(cfg.model), rank, world_size, torch.device("cpu"))
    slow_blocks(strategy.module, forward_s, backward_s)
    engine = StepEngine(strategy.model, cfg, strategy)
    g = torch.Generator().manual_seed(0)
    m = cfg.accumulation_steps(0, strategy.dims.dp)
    micro = [{"input_ids": torch.randint(0, 64, (1, SEQ), generator=g),
              "labels": torch.randint(0, 64, (1, SEQ), generator=g)} for _ in range(m)]
    times = []
    for step in range(steps + 1):
        if world_size > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        engine.forward_backward(micro, step)
        times.append(time.perf_counter() - t0)
        engine.apply()
    return statistics.median(times[1:])


def run(rank: int, world_size: int, out_dir: Path, steps: int, forward_s: float, backward_s: float) -> None:
    torch.set_num_threads(1)
    results = []
    for schedule, per_rank in SCHEDULES:
        for m in MICRO_BATCHES:
            cfg = config(world_size, schedule, per_rank, m)
            results.append({"pp": world_size, "schedule": schedule, "stages_per_rank": per_rank, "micro_batches": m,
                            "step_s": step_seconds(cfg, rank, world_size, steps, forward_s, backward_s)})
    save_result(out_dir, "bubble", rank, results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--backward-ms", type=float, default=40.0)
    args = parser.parse_args()
    forward_s, backward_s = args.forward_ms / 1000, args.backward_ms / 1000
    torch.set_num_threads(1)
    one_process = {m: step_seconds(config(1, "1f1b", 1, m), 0, 1, args.steps, forward_s, backward_s)
                   for m in MICRO_BATCHES}
    rows = []
    for pp in (2, 4):
        out = RESULTS / f"pipeline_bubble_pp{pp}"
        spawn(run, pp, out, args.steps, forward_s, backward_s)
        # the step ends when the last rank is done: the slowest rank's time is the pipeline's
        per_rank = [load_result(out, "bubble", r) for r in range(pp)]
        for entries in zip(*per_rank, strict=True):
            row = dict(max(entries, key=lambda e: e["step_s"]))
            m, v = row["micro_batches"], row["stages_per_rank"]
            row.update(one_process_s=one_process[m], measured=1 - one_process[m] / pp / row["step_s"],
                       formula=(pp - 1) / (v * m + pp - 1))
            rows.append(row)
            print(f"pp={pp} {row['schedule']:17s} m={m:2d}: step {row['step_s'] * 1000:6.0f} ms (one process "
                  f"{one_process[m] * 1000:6.0f} ms), bubble {row['measured']:.3f} (formula {row['formula']:.3f})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_bubble.json").write_text(json.dumps({"forward_ms": args.forward_ms,
                                                               "backward_ms": args.backward_ms, "rows": rows},
                                                              indent=2))


if __name__ == "__main__":
    main()

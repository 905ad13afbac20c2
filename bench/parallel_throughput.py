"""Tokens/s of model-parallel layouts against plain data parallel, on 2 gloo processes, side by side.

The tiny preset's model (and moe-tiny's, for expert parallel) trains the same global batches in each layout:
dp2 (DDP), dp2 with FSDP2, tp2 (tensor + sequence parallel, FSDP2 over a single replica), cp2 (each row split
over the two ranks), pp2 (two pipeline stages, 1F1B over 4 or 8 micro-batches, against dp2 with the same untied
embeddings), and for the mixture of experts dp2 with every expert on each rank against ep2 (experts split,
all-to-all dispatch). Layouts run in
interleaved rounds in the same two processes; each round times `--steps` steps after one warm-up step, and the
median tokens/s per layout is reported with its ratio to its dp2 baseline. On 2 CPU cores the ratio is the cost
of the extra communication (tp: 4 collectives per block forward and backward), not a speed-up: tensor and expert
parallelism are for models or batches that do not fit one device. Writes bench/results/parallel_throughput.json.

    .venv/bin/python bench/parallel_throughput.py [--rounds 3] [--steps 4] [--layouts cp2 pp2-1f1b-m4 ...]
"""

from __future__ import annotations

import argparse
import json
import math
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

SHAPE = ["train.seq_len=256", "train.global_batch_tokens=8192", "train.micro_batch_size=8",
         "parallel.min_workers=2", "parallel.max_workers=2", "optim.grad_clip=1.0"]
UNTIED = "model.tie_embeddings=false"  # a pipeline's embedding and lm_head sit on different stages
LAYOUTS = {
    "dp2": ("tiny", ["parallel.strategy=ddp"]),
    "fsdp2": ("tiny", ["parallel.strategy=fsdp"]),
    "tp2": ("tiny", ["parallel.strategy=fsdp", "parallel.tp=2"]),
    "cp2": ("tiny", ["parallel.strategy=ddp", "parallel.cp=2"]),
    "dp2-untied": ("tiny", ["parallel.strategy=ddp", UNTIED]),
    "pp2-1f1b-m4": ("tiny", ["parallel.strategy=ddp", UNTIED, "parallel.pp=2"]),
    "pp2-1f1b-m8": ("tiny", ["parallel.strategy=ddp", UNTIED, "parallel.pp=2", "train.micro_batch_size=4"]),
    "moe-dp2": ("moe-tiny", ["parallel.strategy=ddp"]),
    "moe-ep2": ("moe-tiny", ["parallel.strategy=ddp", "parallel.ep=2"]),
}
BASELINE = {"dp2": "dp2", "fsdp2": "dp2", "tp2": "dp2", "cp2": "dp2", "dp2-untied": "dp2-untied",
            "pp2-1f1b-m4": "dp2-untied", "pp2-1f1b-m8": "dp2-untied", "moe-dp2": "moe-dp2", "moe-ep2": "moe-dp2"}


def batches(cfg, step: int, replica: int, replicas: int) -> list[dict]:
    g = torch.Generator().manual_seed(step)
    rows = cfg.rows_per_global_batch(step)
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, cfg.train.seq_len + 1), generator=g)
    per = math.ceil(rows / replicas)
    mine = tokens[replica * per:(replica + 1) * per]
    size = cfg.train.micro_batch_size
    return [{"input_ids": mine[i:i + size, :-1], "labels": mine[i:i + size, 1:]} for i in range(0, len(mine), size)]


def run(rank: int, world_size: int, out_dir: Path, rounds: int, steps: int, names: list[str]) -> None:
    from raytrainer.model import Transformer
    from raytrainer.train.engine import StepEngine
    from raytrainer.train.strategies import build_strategy

    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            preset, overrides = LAYOUTS[name]
            cfg = load_config(preset, [*SHAPE, *overrides])
            torch.manual_seed(0)
            strategy = build_strategy(cfg, Transformer(cfg.model), rank, world_size, torch.device("cpu"))
            engine = StepEngine(strategy.model, cfg, strategy)
            dims = strategy.dims
            for step in range(steps + 1):
                if step == 1:
                    t0 = time.perf_counter()
                engine.forward_backward(batches(cfg, step, dims.dp_rank(rank), dims.dp), step)
                engine.apply()
            rates[name].append(steps * cfg.train.global_batch_tokens / (time.perf_counter() - t0))
    save_result(out_dir, "rates", rank, rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS),
                        help="which layouts (their baselines come along)")
    args = parser.parse_args()
    names = list(dict.fromkeys(n for name in args.layouts for n in (BASELINE[name], name)))
    out = RESULTS / "parallel_throughput"
    spawn(run, 2, out, args.rounds, args.steps, names)
    rates = load_result(out, "rates", 0)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    result = {"rounds": args.rounds, "steps": args.steps, "tokens_per_s": medians,
              "ratio_to_baseline": {n: medians[n] / medians[BASELINE[n]] for n in medians}}
    for name, rate in medians.items():
        print(f"{name:8s} {rate:8.0f} tokens/s  x{rate / medians[BASELINE[name]]:.2f} of {BASELINE[name]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "parallel_throughput.json").write_text(json.dumps(result, indent=2))
    for name in ("tp2", "cp2", "pp2-1f1b-m4", "pp2-1f1b-m8"):
        if name in medians:
            print(f"{name}_vs_baseline: {result['ratio_to_baseline'][name]:.2f}")


if __name__ == "__main__":
    main()

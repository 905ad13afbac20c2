"""Chaos soak: the tiny preset, clean and under a seeded schedule of every fault kind (worker kill, hang, NaN,
poisoned batch, exploding gradient, flipped bits in one rank's gradients, S3 outage during a save, SIGTERM),
on a local Ray cluster with checkpoints on a local S3 server. Prints the table of faults injected / detected /
survived and what each cost, and the soak's checks (raytrainer.fault.chaos).

    python bench/chaos.py                        # the tiny preset as shipped, 300 steps (about 30 min here)
    python bench/chaos.py --micro --steps 80     # the micro model: a few minutes
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from raytrainer.soak import soak

MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=32",
         "model.max_seq_len=128", "train.seq_len=64", "train.global_batch_tokens=1024", "train.micro_batch_size=4",
         "checkpoint.every_steps=10", "eval.every_steps=null"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro", action="store_true", help="the micro model instead of the tiny preset's")
    ap.add_argument("--out", default="bench/results/chaos.json")
    args = ap.parse_args()
    overrides = MICRO if args.micro else []
    with tempfile.TemporaryDirectory(prefix="raytrainer-chaos-") as work:
        card, faults, timings = soak("tiny", overrides, args.steps, args.seed, work)
    print(card.table())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "seed": args.seed, "micro": args.micro,
                                          "faults": faults, "rows": card.rows, "checks": card.checks,
                                          "notes": card.notes, "timings_s": timings}, indent=2))
    raise SystemExit(0 if card.ok else 1)


if __name__ == "__main__":
    main()

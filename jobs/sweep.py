"""Sweep hyperparameters with Ray Tune, ASHA stopping the losing trials early:

    python jobs/sweep.py --lr 1e-4:1e-2 --samples 8                         # the tiny preset, 8 sampled rates
    python jobs/sweep.py --lr 1e-3,3e-3,1e-2 --width 64,128 --grid --grace 20 --set train.steps=100
    python jobs/sweep.py --config configs/proxy.yaml --lr 3e-4:3e-2 --warmup 0,100 --samples 16

Each trial trains the configured job (preset or YAML, --set on top) with its sampled optim.lr (--lr: LOW:HIGH
log-uniform, or a list), schedule.warmup_steps (--warmup) and model.d_model (--width), in one process with
--cpus-per-trial CPUs. ASHA compares the trials' training loss at --grace steps and at each doubling, and
stops the worse half. The table of trials is printed, best first; the best one's settings are the last line
and are written to <checkpoint.storage>/<--name>/best.json. See raytrainer/sweep.py.

Exit status: 0 done; 2 a configuration problem; 1 no trial finished.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from raytrainer.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="YAML file or preset name (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for every trial (repeatable)")
    parser.add_argument("--lr", help="optim.lr: LOW:HIGH (log-uniform) or a,b,c")
    parser.add_argument("--warmup", help="schedule.warmup_steps: a,b,c")
    parser.add_argument("--width", help="model.d_model: a,b,c")
    parser.add_argument("--samples", type=int, default=8, help="trials to sample (ignored with --grid)")
    parser.add_argument("--grid", action="store_true", help="every combination of the listed values, once")
    parser.add_argument("--grace", type=int, default=None,
                        help="steps before ASHA may stop a trial (default: a quarter of train.steps)")
    parser.add_argument("--name", default="sweep", help="the sweep's directory under checkpoint.storage")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: as many as fit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raytrainer.config import load_config
    from raytrainer.sweep import Space, run_sweep

    try:
        space = Space.parse(args.lr, args.warmup, args.width)
        cfg = load_config(args.config, args.overrides)
        grace = args.grace if args.grace is not None else max(1, cfg.train.steps // 4)
        summary = run_sweep(args.config, args.overrides, space, args.samples, args.grid, grace,
                            cfg.checkpoint.storage, args.name, args.cpus_per_trial, args.max_concurrent)
    except (ConfigError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'loss':>10}  {'step':>6}  settings")
    for row in summary["trials"]:
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        note = f"  ({row['error']})" if row["error"] else ""
        print(f"{loss:>10}  {row['step'] if row['step'] is not None else '-':>6}  {row['params']}{note}")
    best = summary["best"]
    if best is None or best["error"] is not None or not math.isfinite(best["loss"] or math.inf):
        print("no trial finished", file=sys.stderr)
        return 1
    print(f"best: {best['params']} (loss {best['loss']:.4f} at step {best['step']}); "
          f"{cfg.checkpoint.storage}/{args.name}/best.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""μP learning-rate transfer: the best rate found at a small width stays best at larger widths with μP on, and
moves with it off (standard parametrization).

The same short run of a 2-layer model on the sample corpus (byte tokens, 1,024-token batches, warmup then
cosine, guardian off: the raw sensitivity to the rate is measured) at widths 64, 128 and 256 over a grid of
rates, twice: with model.mup_base_d_model=64 and without. Each run trains in this process through the
sweep's trial runner (raytrainer.sweep.run_trial), so it is what `jobs/sweep.py` would measure per trial.
Scored by the mean training loss of the last 10% of steps. Writes bench/results/mup_transfer.json and
mup_transfer.png (loss against rate, one curve per width, μP off and on side by side).

    .venv/bin/python bench/mup_transfer.py [--steps 100] [--widths 64,128,256] [--lrs 5e-4,1e-3,...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from raytrainer.config import load_config  # noqa: E402
from raytrainer.sweep import run_trial  # noqa: E402

BASE_WIDTH = 64
MODEL = ["model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.multiple_of=32", "model.max_seq_len=128",
         "train.seq_len=128", "train.global_batch_tokens=1024", "train.micro_batch_size=8", "train.log_every=1",
         "schedule.warmup_steps=10", "guardian.enabled=false", "eval.every_steps=null", "checkpoint.every_steps=100000",
         "checkpoint.async_upload=false"]


def dataset(work: Path) -> Path:
    from raytrainer.data.sample_corpus import make_sample_dataset

    out = work / "dataset"
    make_sample_dataset(str(out), max_bytes=600_000, shard_tokens=1 << 16, use_ray=False)
    return out


def final_loss(data: Path, work: Path, width: int, lr: float, mup: bool, steps: int) -> float:
    name = f"w{width}-lr{lr:g}-{'mup' if mup else 'sp'}"
    cfg = load_config("tiny", [*MODEL, f"model.d_model={width}", f"optim.lr={lr}", f"train.steps={steps}",
                               f"data.path={data}", f"checkpoint.storage={work / 'runs'}", f"run.name={name}",
                               *([f"model.mup_base_d_model={BASE_WIDTH}"] if mup else [])])
    losses: dict[int, float] = {}
    run_trial(cfg, lambda m: losses.__setitem__(m["step"], m["loss"]), threads=2)
    tail = [losses[s] for s in sorted(losses)[-max(1, steps // 10):]]
    value = statistics.fmean(tail) if tail else math.inf
    return value if math.isfinite(value) else math.inf


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("sp", "mup"), strict=True):
        for width, row in result[mode].items():
            points = [(float(lr), loss) for lr, loss in row.items() if math.isfinite(loss)]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"width {width}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title("μP (base width 64)" if mode == "mup" else "standard parametrization")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"training loss, mean of the last {result['tail_steps']} of {result['steps']} steps")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--widths", default="64,128,256")
    parser.add_argument("--lrs", default="5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    RESULTS.mkdir(exist_ok=True)
    result = {"steps": args.steps, "tail_steps": max(1, args.steps // 10), "widths": widths, "lrs": lrs}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = dataset(work)
        for mode in ("sp", "mup"):
            result[mode] = {}
            for width in widths:
                result[mode][str(width)] = {str(lr): final_loss(data, work, width, lr, mode == "mup", args.steps)
                                            for lr in lrs}
                row = result[mode][str(width)]
                print(f"{mode:>4} width {width:>4}: " + "  ".join(f"{lr}: {loss:.4f}" for lr, loss in row.items()),
                      flush=True)
    result["seconds"] = round(time.monotonic() - t0)
    result["best"] = {mode: {w: min(row, key=row.get) for w, row in result[mode].items()} for mode in ("sp", "mup")}
    for mode in ("sp", "mup"):
        best = result["best"][mode]
        moves = len(set(best.values())) > 1
        print(f"{'μP' if mode == 'mup' else 'SP'}: best rate per width {best} -> {'moves' if moves else 'stays'}")
    (RESULTS / "mup_transfer.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "mup_transfer.png")
    print(f"{RESULTS / 'mup_transfer.png'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()

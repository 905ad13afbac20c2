"""Organic loss spikes: provoke real ones on real text, label them from the whole curve, score the detectors.

Nothing here is injected. Runs train in process, with the guardian off, on the sample corpus (Python's own
prose and code): the micro model of the test suite (tests/runs.py, seconds per run) at the `tiny` preset's
learning rate and at rates that make training unstable (higher, no warmup), and, with --preset, the `tiny`
preset itself as shipped (2-3 s a step on 2 cores). Curves of runs made elsewhere join with --metrics (a
run's metrics/*.jsonl: the default job's, say). Every step's loss and grad norm go to
bench/results/organic_curves.json, so `--replay` scores changed detectors without training again.

Labels come from the whole curve, after the fact: the baseline at step t is the median loss of the 32 steps
before it, and a spike is a run of consecutive steps whose loss stays above 1.5x that baseline; it *doubles*
when its peak exceeds 2x the baseline at its first step. The detectors (raytrainer.fault.detectors, with
the `tiny` preset's guardian settings) then see each curve step by step as the guardian would, learning
only from the steps they call healthy. Reported:

- recall: doubling spikes caught within 2 steps of their first step (target: all of them);
- false alarms: findings outside every labelled spike (and the 3 steps after one), on every run;
- interventions on the clean runs (no doubling spike) at the preset learning rate (target: 0).

    .venv/bin/python bench/organic_spikes.py [--preset] [--metrics runs/tiny/metrics/X.jsonl] [--replay]
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
RESULTS = ROOT / "bench" / "results"
CURVES = RESULTS / "organic_curves.json"
sys.path.insert(0, str(ROOT))

from raytrainer.config import Config, load_config  # noqa: E402
from raytrainer.fault.detectors import Detectors  # noqa: E402

LABEL_WINDOW = 32
LABEL_RISE = 1.5
DOUBLING = 2.0
CATCH_WITHIN = 2
AFTERGLOW = 3  # steps after a spike ends in which a finding is not a false alarm

# (name, model, overrides, steps): the preset's own rate, and the ways people make training unstable.
MICRO_RUNS = [
    ("micro-lr3e-3", ["optim.lr=3e-3"], 300),
    ("micro-lr3e-3-seed1", ["optim.lr=3e-3", "train.seed=1"], 300),
    ("micro-lr3e-2", ["optim.lr=3e-2"], 300),
    ("micro-lr3e-2-seed1", ["optim.lr=3e-2", "train.seed=1"], 300),
    ("micro-lr1e-1-nowarmup", ["optim.lr=1e-1", "schedule.warmup_steps=0"], 300),
]
# A quarter of the preset's batch (2,048 tokens): one unusual document then carries a batch, and the loss of
# such batches more than doubles on the sample corpus by its content alone, at the preset's own rate and at
# unstable settings alike (no QK-norm, no clipping, Adam beta2 0.999, 10x the rate, no warmup).
SMALL_BATCH = ["train.seq_len=128", "train.global_batch_tokens=2048", "train.micro_batch_size=16"]
PRESET_RUNS = [
    ("tiny-preset", [], 200),
    ("tiny-lr3e-2-nowarmup", ["optim.lr=3e-2", "schedule.warmup_steps=0"], 120),
    ("tiny-lr1e-2-nowarmup", ["optim.lr=1e-2", "schedule.warmup_steps=0"], 120),
    ("tiny-2k-tokens", SMALL_BATCH, 200),
    ("tiny-2k-tokens-unstable", [*SMALL_BATCH, "model.qk_norm=false", "optim.grad_clip=null",
                                 "optim.betas=[0.9,0.999]", "optim.lr=3e-2", "schedule.warmup_steps=0"], 200),
]
PRESET_LR = 3e-3  # the tiny preset's optim.lr: runs at it without a doubling spike are the clean ones


def dataset_path() -> str:
    """The default job's sample corpus when it is there (`make pretrain` writes it), else a fresh one."""
    local = ROOT / "data" / "sample"
    if (local / "manifest.json").exists():
        return str(local)
    from raytrainer.data.sample_corpus import make_sample_dataset

    out = Path(tempfile.mkdtemp(prefix="rt-organic-data-")) / "sample"
    make_sample_dataset(str(out), use_ray=False)
    return str(out)


def train_curve(cfg: Config) -> list[dict]:
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import build_trainer

    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"))
    history = trainer.fit()["history"]
    return [{"step": h["step"], "loss": h["loss"], "grad_norm": h["grad_norm"]} for h in history if "loss" in h]


def run_config(name: str, model: list[str], overrides: list[str], steps: int, data: str, storage: str) -> Config:
    return load_config("tiny", [*model, f"data.path={data}", f"checkpoint.storage={storage}", f"run.name={name}",
                                f"train.steps={steps}", "guardian.enabled=false", "eval.every_steps=null",
                                "metrics.report=false", "metrics.tensorboard=false",
                                "checkpoint.every_steps=100000", *overrides])


def record(preset: bool, only: list[str] | None = None) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from runs import MICRO_MODEL, make_dataset

    curves = {}
    with tempfile.TemporaryDirectory(prefix="rt-organic-") as tmp:
        micro_data = str(make_dataset(Path(tmp)))
        runs = [(n, MICRO_MODEL, o, s, micro_data) for n, o, s in MICRO_RUNS]
        if preset:
            runs += [(n, [], o, s, dataset_path()) for n, o, s in PRESET_RUNS]
        for name, model, overrides, steps, data in runs:
            if only and name not in only:
                continue
            cfg = run_config(name, model, overrides, steps, data, tmp)
            t0 = time.perf_counter()
            curves[name] = {"model": "micro" if model else "tiny", "overrides": overrides, "lr": cfg.optim.lr,
                            "curve": train_curve(cfg)}
            print(f"{name}: {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"guardian_preset": "tiny", "runs": curves}


def curve_from_metrics(path: Path) -> dict:
    """A run's every-step record (raytrainer's metrics/*.jsonl): the steps of its last attempt."""
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in steps if r.get("kind") == "step"]
    return {"model": "tiny", "overrides": [f"from {path}"], "lr": PRESET_LR,
            "curve": [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in steps]}


# --------------------------------------------------------------------------- labels and scores


def label_spikes(losses: list[float], start: int) -> list[dict]:
    """Runs of steps whose loss stays above LABEL_RISE x the median of the LABEL_WINDOW steps before."""
    spikes, i = [], max(start, LABEL_WINDOW)
    while i < len(losses):
        base = statistics.median(losses[i - LABEL_WINDOW:i])
        if losses[i] > LABEL_RISE * base:
            j = i
            while j + 1 < len(losses) and losses[j + 1] > LABEL_RISE * base:
                j += 1
            peak = max(losses[i:j + 1])
            spikes.append({"start": i, "end": j, "baseline": base, "peak": peak, "ratio": peak / base,
                           "doubling": peak > DOUBLING * base})
            i = j + 1
        else:
            i += 1
    return spikes


def replay(curve: list[dict], cfg: Config) -> list[dict]:
    """The detectors' findings, step by step, as the guardian would see the curve."""
    detectors = Detectors(cfg.guardian)
    found = []
    for point in curve:
        findings = detectors.check(point["step"], point["loss"], point["grad_norm"])
        if findings:
            found.append({"step": point["step"], "kinds": [f.kind for f in findings],
                          "detail": "; ".join(f.detail for f in findings)})
    return found


def score(data: dict) -> dict:
    cfg = load_config(data["guardian_preset"])
    start = cfg.guardian.warmup_exempt_steps
    table, caught, doubling, false_alarms, preset_interventions = [], 0, 0, 0, 0
    for name, run in data["runs"].items():
        losses = [p["loss"] for p in run["curve"]]
        spikes = label_spikes(losses, start)
        found = replay(run["curve"], cfg)
        steps_found = [f["step"] for f in found]
        for s in spikes:
            hit = next((t for t in steps_found if s["start"] <= t <= s["end"]), None)
            s["caught_at"] = hit
            s["latency"] = None if hit is None else hit - s["start"]
            if s["doubling"]:
                doubling += 1
                caught += hit is not None and hit - s["start"] <= CATCH_WITHIN
        inside = {t for s in spikes for t in range(s["start"], s["end"] + 1 + AFTERGLOW)}
        false = [f for f in found if f["step"] not in inside]
        false_alarms += len(false)
        clean = not any(s["doubling"] for s in spikes)
        if run["lr"] == PRESET_LR and clean:  # a run with doubling spikes should see interventions
            preset_interventions += len(found)
        table.append({"run": name, "lr": run["lr"], "spikes": spikes, "findings": found, "false_alarms": false,
                      "clean": clean})
    return {"guardian": cfg.guardian.model_dump(), "doubling_spikes": doubling, "caught_within_2": caught,
            "false_alarms": false_alarms,
            "interventions_on_clean_preset_runs": preset_interventions, "runs": table}


# The organic spike a run of the tiny preset went through on real prose: loss 2.54 at step 100, 3.94 at 110,
# 5.87 at 120, 2.61 at 130 (logged every 10 steps). Its shape, as factors over the loss before it.
REPORTED_SHAPE = [(0, 1.0), (10, 3.94 / 2.54), (20, 5.87 / 2.54), (30, 2.61 / 2.54)]


def reported_shape(length: int = 31) -> list[float]:
    out = []
    for t in range(length):
        (a, fa), (b, fb) = next(((p, q) for p, q in zip(REPORTED_SHAPE, REPORTED_SHAPE[1:], strict=False)
                                  if p[0] <= t <= q[0]), (REPORTED_SHAPE[-2], REPORTED_SHAPE[-1]))
        out.append(fa + (fb - fa) * (t - a) / (b - a))
    return out


def score_reported_shape(data: dict, at: int = 60) -> list[dict]:
    """The reported spike's shape laid over each clean curve at step `at`: the step the detectors first
    fire, against the step the loss first exceeds twice the baseline (the doubling)."""
    cfg = load_config(data["guardian_preset"])
    rows = []
    for name, run in data["runs"].items():
        if run["lr"] != PRESET_LR or len(run["curve"]) < at + 31:
            continue
        if any(s["doubling"] for s in label_spikes([p["loss"] for p in run["curve"]], 0)):
            continue  # not a clean curve to lay the shape over
        curve = [dict(p) for p in run["curve"]]
        base = statistics.median(p["loss"] for p in curve[at - LABEL_WINDOW:at])
        for t, factor in enumerate(reported_shape()):
            curve[at + t]["loss"] *= factor
        doubled = next(at + t for t in range(31) if curve[at + t]["loss"] > DOUBLING * base)
        found = [f["step"] for f in replay(curve, cfg) if f["step"] >= at]
        first = found[0] if found else None
        rows.append({"run": name, "at": at, "doubled_at": doubled, "caught_at": first,
                     "latency_after_doubling": None if first is None else first - doubled})
    return rows


def score_early_doublings(data: dict, factors: tuple[float, ...] = (2.0, 2.2), upto: int = 60) -> list[dict]:
    """A poisoned batch early in the run, while the loss still falls fast: each step of each clean curve at
    the preset rate, from the first one the detectors may judge to `upto`, in turn carries `factor` times
    its own loss. Caught: the detectors fire at that step. With the micro runs' windows (those of the test
    suite's soak) and with the preset's."""
    micro = load_config(data["guardian_preset"], ["guardian.warmup_exempt_steps=5", "guardian.min_window=8",
                                                  "guardian.window=16"])
    rows = []
    for label, cfg in (("test-suite windows", micro), ("preset windows", load_config(data["guardian_preset"]))):
        curves = [r["curve"] for r in data["runs"].values() if r["lr"] == PRESET_LR and len(r["curve"]) >= upto
                  and not any(s["doubling"] for s in label_spikes([p["loss"] for p in r["curve"]], 0))]
        first = max(cfg.guardian.warmup_exempt_steps, cfg.guardian.min_window)
        for factor in factors:
            caught = total = 0
            for curve in curves:
                for at in range(first, upto):
                    detectors = Detectors(cfg.guardian)
                    for p in curve[:at]:
                        detectors.check(p["step"], p["loss"], p["grad_norm"])
                    total += 1
                    caught += bool(detectors.check(at, factor * curve[at]["loss"], curve[at]["grad_norm"]))
            rows.append({"windows": label, "factor": factor, "steps": f"{first}-{upto - 1}", "curves": len(curves),
                         "caught": caught, "total": total})
    return rows


def print_table(result: dict) -> None:
    print(f"{'run':<20}{'lr':>8}{'spikes':>8}{'doubling':>10}{'caught':>8}{'findings':>10}{'false':>7}")
    for r in result["runs"]:
        d = [s for s in r["spikes"] if s["doubling"]]
        ok = sum(1 for s in d if s["latency"] is not None and s["latency"] <= CATCH_WITHIN)
        print(f"{r['run']:<20}{r['lr']:>8.0e}{len(r['spikes']):>8}{len(d):>10}{ok:>8}{len(r['findings']):>10}"
              f"{len(r['false_alarms']):>7}")
        for s in r["spikes"]:
            print(f"    spike steps {s['start']}-{s['end']}: x{s['ratio']:.2f} over {s['baseline']:.3f}, "
                  f"caught at {s['caught_at']}")
        for f in r["false_alarms"]:
            print(f"    false alarm at step {f['step']}: {f['detail']}")
    for r in result["reported_shape"]:
        print(f"reported spike's shape over {r['run']} at step {r['at']}: doubles at {r['doubled_at']}, caught at "
              f"{r['caught_at']} ({r['latency_after_doubling']} steps after the doubling)")
    for r in result["early_doublings"]:
        print(f"x{r['factor']:g} laid on each step {r['steps']} of {r['curves']} clean curves ({r['windows']}): "
              f"caught at {r['caught']} of {r['total']}")
    print(f"doubling spikes caught within {CATCH_WITHIN} steps: {result['caught_within_2']}/"
          f"{result['doubling_spikes']}; false alarms: {result['false_alarms']}; interventions on clean preset "
          f"runs: {result['interventions_on_clean_preset_runs']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="store_true", help="also train the tiny preset as shipped (slow)")
    parser.add_argument("--metrics", action="append", default=[], type=Path,
                        help="add the curve of a run's metrics/*.jsonl (repeatable)")
    parser.add_argument("--replay", action="store_true", help="score the curves already recorded")
    parser.add_argument("--only", action="append", default=[],
                        help="train only this run (repeatable); the other recorded curves are kept")
    args = parser.parse_args()
    torch.set_num_threads(2)
    RESULTS.mkdir(exist_ok=True)
    if args.replay:
        data = json.loads(CURVES.read_text())
    elif args.only:
        data = json.loads(CURVES.read_text()) if CURVES.exists() else {"guardian_preset": "tiny", "runs": {}}
        data["runs"].update(record(True, args.only)["runs"])
    else:
        data = record(args.preset)
    for path in args.metrics:
        data["runs"][f"metrics:{path.parent.parent.name}/{path.stem}"] = curve_from_metrics(path)
    if not args.replay or args.metrics or args.only:
        CURVES.write_text(json.dumps(data))
    result = score(data)
    result["reported_shape"] = score_reported_shape(data)
    result["early_doublings"] = score_early_doublings(data)
    (RESULTS / "organic_spikes.json").write_text(json.dumps(result, indent=2))
    print_table(result)


if __name__ == "__main__":
    main()

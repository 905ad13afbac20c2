"""Hyperparameter sweeps: trials of the trainer under Ray Tune, the losing ones stopped early by ASHA.

    python jobs/sweep.py --samples 8 --lr 1e-4:1e-2 --warmup 0,20,50 --width 64,128 --set train.steps=200

A trial is one training run of the configured job with its sampled settings, in one process: a sweep's proxy
models fit one device, and with μP (model.mup_base_d_model) the rates found at the proxy's width carry over
to the full one (bench/mup_transfer.py shows it). The search space: `lr` (optim.lr; A:B log-uniform, or a
list), `warmup` (schedule.warmup_steps) and `width` (model.d_model), each a list to choose from (every
combination with --grid). A trial reports its loss every train.log_every steps; ASHA compares the trials at
`grace`, 2x`grace`, ... steps and stops the worse half at each. The guardian watches every trial, and a trial
it aborts ends with an infinite loss instead of failing the sweep. Each trial's checkpoints and metrics go to
<checkpoint.storage>/<sweep>/<trial>; the best trial's settings go to best.json beside them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from raytrainer.config import Config, ConfigError, load_config

log = logging.getLogger("raytrainer.sweep")

# Search-space names and the config key each one sets.
KEYS = {"lr": "optim.lr", "warmup": "schedule.warmup_steps", "width": "model.d_model"}


@dataclass
class Space:
    """What a sweep searches: a log-uniform range or a list of values per name (absent: the config's)."""

    lr_range: tuple[float, float] | None = None
    values: dict[str, list] | None = None

    @classmethod
    def parse(cls, lr: str | None, warmup: str | None, width: str | None) -> Space:
        values: dict[str, list] = {}
        lr_range = None
        try:
            if lr and ":" in lr:
                low, high = (float(x) for x in lr.split(":"))
                if not 0 < low < high:
                    raise ValueError
                lr_range = (low, high)
            elif lr:
                values["lr"] = [float(x) for x in lr.split(",")]
        except ValueError:
            raise ConfigError(f"--lr {lr!r}: expected LOW:HIGH (log-uniform, 0 < LOW < HIGH) or a list a,b,c") from None
        for name, text in (("warmup", warmup), ("width", width)):
            if text:
                try:
                    values[name] = [int(x) for x in text.split(",")]
                except ValueError:
                    raise ConfigError(f"--{name} {text!r}: expected whole numbers, e.g. 64,128") from None
        if lr_range is None and not values:
            raise ConfigError("nothing to search: give --lr, --warmup and/or --width")
        return cls(lr_range, values)

    def tune_space(self, grid: bool) -> dict:
        from ray import tune

        if grid and self.lr_range is not None:
            raise ConfigError("--grid needs lists only: give --lr as values (a,b,c), not a range")
        pick = tune.grid_search if grid else tune.choice
        space = {name: pick(vals) for name, vals in (self.values or {}).items()}
        if self.lr_range is not None:
            space["lr"] = tune.loguniform(*self.lr_range)
        return space

    def corners(self) -> list[dict]:
        """Settings at the edges of the space, to refuse a bad one before any trial starts."""
        lrs = list(self.lr_range) if self.lr_range else (self.values or {}).get("lr", [None])
        out = []
        for lr in lrs:
            for warmup in (self.values or {}).get("warmup", [None]):
                for width in (self.values or {}).get("width", [None]):
                    out.append({k: v for k, v in (("lr", lr), ("warmup", warmup), ("width", width)) if v is not None})
        return out


def trial_overrides(params: dict) -> list[str]:
    """A trial's sampled settings as config overrides."""
    return [f"{KEYS[name]}={value}" for name, value in sorted(params.items())]


def trial_config(preset: str, overrides: list[str], params: dict, storage: str, name: str) -> Config:
    return load_config(preset, [*overrides, *trial_overrides(params), f"checkpoint.storage={storage}",
                                f"run.name={name}", "run.resume=true"])


def run_trial(cfg: Config, report: Callable[[dict], None], threads: int = 1) -> dict:
    """Train one trial in this process; `report` gets {"step", "loss"} every train.log_every steps (and the
    last step). Returns the last report; a guardian abort ends it with an infinite loss."""
    import torch

    from raytrainer.fault.guardian import Guardian, GuardianAbort
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import build_trainer

    torch.set_num_threads(threads)
    last: dict = {"step": 0, "loss": math.inf}

    def on_report(metrics: dict, checkpoint_step: int | None = None) -> None:
        last.update(step=int(metrics["step"]), loss=float(metrics["loss"]))
        report(dict(last))

    env = WorkerEnv(report=on_report)
    trainer = build_trainer(cfg, env, torch.device("cpu"), guardian=Guardian(cfg.guardian), data_in_process=True)
    try:
        trainer.fit()
    except GuardianAbort as e:
        log.warning("trial %s: the guardian aborted it (%s); it counts as an infinite loss",
                    cfg.run.name, str(e).splitlines()[0])
        last.update(step=last["step"] + 1, loss=math.inf, aborted=True)
        report(dict(last))
    return dict(last)


def last_line(text: str) -> str:
    """A trial's error as Ray hands it over ends with the exception's own message; the rest is Ray's frame."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def run_sweep(preset: str, overrides: list[str], space: Space, samples: int, grid: bool, grace: int,
              storage: str, name: str, cpus_per_trial: float = 1.0, max_concurrent: int = 0) -> dict:
    """Run the sweep on the current (or a local) Ray cluster; returns the best trial's settings and loss."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raytrainer.data.validate import validate_data_config
    from raytrainer.launch import absolute_local_paths, init_ray
    from raytrainer.storage import open_storage

    base = absolute_local_paths(load_config(preset, overrides))
    overrides = [*overrides, f"data.path={base.data.path}"]
    for corner in space.corners():  # a width the heads do not divide, say: named now, not in a failed trial
        trial_config(preset, overrides, corner, storage, "probe")
    validate_data_config(base.data, model_vocab_size=base.model.vocab_size)  # a missing dataset: named once, here
    steps = base.train.steps
    if not 0 < grace <= steps:
        raise ConfigError(f"--grace {grace}: must be between 1 and train.steps={steps}")
    local = "://" not in storage
    root = f"{os.path.abspath(storage) if local else storage.rstrip('/')}/{name}"

    def trainable(params: dict) -> None:
        trial = f"{name}-{tune.get_context().get_trial_id()}"
        run_trial(trial_config(preset, overrides, params, root, trial), tune.report)

    init_ray(base)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus_per_trial}),
        param_space=space.tune_space(grid),
        tune_config=tune.TuneConfig(
            metric="loss", mode="min", num_samples=1 if grid else samples, max_concurrent_trials=max_concurrent,
            scheduler=ASHAScheduler(time_attr="step", max_t=steps, grace_period=grace, reduction_factor=2)),
        # Tune's own trial records: beside the trials on local disk (elsewhere, Tune's default directory).
        run_config=tune.RunConfig(name="tune", storage_path=root if local else None, verbose=0),
    )
    results = tuner.fit()
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append({"params": {k: result.config[k] for k in sorted(result.config)},
                     "step": metrics.get("step"), "loss": metrics.get("loss", math.inf),
                     "error": None if result.error is None else last_line(str(result.error))})
    rows.sort(key=lambda r: (r["loss"] if r["loss"] is not None else math.inf))
    finished = [r for r in rows if r["error"] is None and r["step"] is not None and r["step"] >= steps - 1]
    best = finished[0] if finished else (rows[0] if rows else None)
    summary = {"sweep": name, "preset": preset, "overrides": overrides, "steps": steps, "grace": grace,
               "best": best, "trials": rows}
    open_storage(root, base.checkpoint.s3).write_bytes("best.json", json.dumps(summary, indent=2).encode())
    ray.shutdown()
    return summary

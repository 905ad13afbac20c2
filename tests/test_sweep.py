"""Sweeps: a 4-trial grid runs under Ray Tune with ASHA and names its best trial; a search space that cannot
work is refused before any trial starts, naming the value."""

from __future__ import annotations

import json
import math

import pytest

from raytrainer.config import ConfigError
from raytrainer.sweep import Space, run_sweep, trial_overrides
from runs import MICRO, make_dataset


def test_the_search_space_parses_and_maps_onto_config_keys():
    space = Space.parse("1e-4:1e-2", "0,20", "64,128")
    assert space.lr_range == (1e-4, 1e-2) and space.values == {"warmup": [0, 20], "width": [64, 128]}
    assert len(space.corners()) == 2 * 2 * 2
    assert trial_overrides({"lr": 3e-3, "width": 128}) == ["optim.lr=0.003", "model.d_model=128"]
    for lr, match in (("1e-2:1e-4", "LOW:HIGH"), ("fast", "LOW:HIGH")):
        with pytest.raises(ConfigError, match=match):
            Space.parse(lr, None, None)
    with pytest.raises(ConfigError, match="nothing to search"):
        Space.parse(None, None, None)
    with pytest.raises(ConfigError, match="--width '64,wide': expected whole numbers"):
        Space.parse(None, None, "64,wide")
    with pytest.raises(ConfigError, match="--grid needs lists only"):
        space.tune_space(grid=True)


def test_a_width_the_heads_do_not_divide_is_named_before_any_trial(tmp_path):
    with pytest.raises(ValueError, match="model.n_heads=4 must divide model.d_model=66"):
        run_sweep("tiny", [*MICRO, f"data.path={tmp_path}"], Space.parse("1e-3,3e-3", None, "64,66"), 4, True, 5,
                  str(tmp_path / "runs"), "bad")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match=f"{tmp_path}/manifest.json: not found"):  # no dataset there
        run_sweep("tiny", [*MICRO, f"data.path={tmp_path}"], Space.parse("1e-3,3e-3", None, "64"), 4, True, 5,
                  str(tmp_path / "runs"), "nodata")


@pytest.mark.slow
def test_a_four_trial_grid_completes_and_names_its_best_trial(tmp_path):
    dataset = make_dataset(tmp_path)
    overrides = [*MICRO, f"data.path={dataset}", "train.steps=20", "checkpoint.every_steps=100",
                 "eval.every_steps=null"]
    storage = str(tmp_path / "runs")
    summary = run_sweep("tiny", overrides, Space.parse("3e-4,3e-3", None, "32,64"), samples=4, grid=True, grace=5,
                        storage=storage, name="grid", max_concurrent=2)
    trials = summary["trials"]
    assert sorted((t["params"]["lr"], t["params"]["width"]) for t in trials) == \
        [(3e-4, 32), (3e-4, 64), (3e-3, 32), (3e-3, 64)]
    assert all(t["error"] is None and math.isfinite(t["loss"]) for t in trials), trials
    finished = [t for t in trials if t["step"] == 19]
    assert finished and summary["best"] in finished
    assert summary["best"]["loss"] == min(t["loss"] for t in finished)
    # The slow rate learns less in 20 steps: ASHA stops it at a rung, or it finishes behind.
    assert summary["best"]["params"]["lr"] == 3e-3
    best = json.loads((tmp_path / "runs" / "grid" / "best.json").read_text())
    assert best["best"] == summary["best"]
    # Every trial is a run of its own, with its own metrics.
    runs = [p for p in (tmp_path / "runs" / "grid").iterdir() if p.name.startswith("grid-")]
    assert len(runs) == 4 and all(list((p / "metrics").glob("*.jsonl")) for p in runs)

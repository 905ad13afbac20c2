"""A run that starts from another run's full state (model.init_state=full) goes on exactly where that run
would have: branching a WSD stable-phase checkpoint into its decay trains the same steps as one run that
decays there. Weights only, or other data, is another run; a source that does not fit is refused by name."""

from __future__ import annotations

import pytest
import torch

from raytrainer.config import ConfigError
from raytrainer.fault.guardian import Guardian
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from raytrainer.warm_start import WarmStartRefused, branch_point
from runs import make_dataset, micro_config

# Stable at the preset's lr after 5 warmup steps; the decay takes the last 6 steps from step 10.
WSD = ["schedule.name=wsd", "schedule.decay_start=10", "schedule.decay_steps=6", "guardian.enabled=false"]


def fit(cfg) -> tuple[list[tuple[int, float]], object]:
    torch.set_num_threads(1)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    trainer.fit()
    return [(h["step"], h["loss"]) for h in trainer.history if "loss" in h], trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("branch")
    dataset = make_dataset(root)
    storage = str(root / "runs")
    # One run through its decay, and one that stops where its stable phase would go on (checkpoint 10).
    whole, _ = fit(micro_config(dataset, storage, name="whole", steps=16, extra=WSD))
    fit(micro_config(dataset, storage, name="stable", steps=10, extra=WSD))
    return dataset, storage, dict(whole)


def test_a_wsd_decay_branched_from_a_stable_checkpoint_trains_the_same_steps_as_one_run(runs):
    dataset, storage, whole = runs
    cfg = micro_config(dataset, storage, name="decay", steps=16,
                       extra=[*WSD, f"model.init_from=run:{storage}/stable@10", "model.init_state=full"])
    branched, trainer = fit(cfg)
    assert [s for s, _ in branched] == list(range(10, 16))  # it goes on from step 10, not from 0
    assert branched == [(s, whole[s]) for s in range(10, 16)]  # model, optimizer, step, RNG and data position
    assert trainer.feed.batch_index == 15
    # Stopped and started again, it resumes from its own checkpoint, not from the source.
    more = micro_config(dataset, storage, name="decay", steps=18,
                        extra=[*WSD, f"model.init_from=run:{storage}/stable@10", "model.init_state=full"])
    assert [s for s, _ in fit(more)[0]] == [16, 17]


def test_weights_only_or_other_data_is_another_run(runs):
    dataset, storage, whole = runs
    weights = micro_config(dataset, storage, name="weights", steps=6,
                           extra=[*WSD, "schedule.name=constant", f"model.init_from=run:{storage}/stable@10"])
    losses, _ = fit(weights)
    assert [s for s, _ in losses] == list(range(6))  # its own steps, a fresh optimizer and schedule
    other = make_dataset(dataset.parent / "other")  # the same corpus elsewhere: another data section
    moved = micro_config(other, storage, name="moved", steps=16,
                         extra=[*WSD, f"model.init_from=run:{storage}/stable@10", "model.init_state=full"])
    losses, trainer = fit(moved)
    assert [s for s, _ in losses] == list(range(10, 16))
    assert trainer.feed.batch_index == 5  # the new data from its beginning
    assert losses[0][1] != whole[10]
    # How the data is read is not which data: the position is kept.
    faster = micro_config(dataset, storage, name="faster", steps=12,
                          extra=[*WSD, f"model.init_from=run:{storage}/stable@10", "model.init_state=full",
                                 "data.prefetch_batches=8", "data.read_tasks=2"])
    assert fit(faster)[0] == [(s, whole[s]) for s in (10, 11)]


def test_a_source_that_cannot_be_branched_from_is_refused_by_name(runs):
    dataset, storage, _ = runs
    with pytest.raises(ConfigError, match="model.init_state=full needs model.init_from=run:"):
        micro_config(dataset, storage, extra=["model.init_state=full"])
    source = [f"model.init_from=run:{storage}/stable@10", "model.init_state=full"]
    with pytest.raises(WarmStartRefused, match=r"train.steps=10: nothing is left to train.*decay_start=10"):
        branch_point(micro_config(dataset, storage, name="short", steps=10, extra=source))
    with pytest.raises(WarmStartRefused, match="does not fit the configured model.*wrong shape"):
        branch_point(micro_config(dataset, storage, name="wide", steps=16, extra=[*source, "model.d_model=128"]))
    with pytest.raises(WarmStartRefused, match="step 7 is not a complete checkpoint"):
        branch_point(micro_config(dataset, storage, name="odd", steps=16,
                                  extra=[f"model.init_from=run:{storage}/stable@7", "model.init_state=full"]))

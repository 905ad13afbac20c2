"""The training loop end to end in one process: learning, exact resume, torn checkpoints, and the guardian
acting on injected faults (NaN, poisoned batch, exploding gradient) with skips, rollbacks and aborts."""

from __future__ import annotations

import math

import pytest
import torch

from raytrainer.checkpoint import CheckpointStore
from raytrainer.config import load_config
from raytrainer.fault.events import EventLog, RunStore, read_events
from raytrainer.fault.guardian import Guardian
from raytrainer.train.loop import GuardianAbort, WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import make_dataset, make_patterned_dataset, micro_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("loop-data"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(cfg):
    events = EventLog(RunStore.for_run(cfg))
    guardian = Guardian(cfg.guardian, cfg.run.name, on_event=events.append)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=guardian)
    result = trainer.fit()
    return result["history"], guardian


def losses(history, start=0):
    return {h["step"]: h["loss"] for h in history if "loss" in h and h["step"] >= start and h["applied"]}


@pytest.fixture(scope="module")
def clean_run(dataset, tmp_path_factory):
    storage = tmp_path_factory.mktemp("clean")
    cfg = micro_config(dataset, str(storage), name="clean", steps=40)
    history, guardian = train(cfg)
    return cfg, history, guardian, storage


def test_clean_run_learns_without_interventions(clean_run):
    cfg, history, guardian, storage = clean_run
    loss = losses(history)
    assert len(loss) == 40
    assert sum(list(loss.values())[-5:]) / 5 < sum(list(loss.values())[:5]) / 5 - 1.0
    assert [h for h in history if h.get("action") != "continue"] == []
    assert guardian.events == [] or all(e.get("action") in (None, "continue") for e in guardian.events)
    store = CheckpointStore(str(storage), "clean")
    assert store.latest_complete() == 40
    assert store.steps() == [30, 40]  # checkpoint.keep_last=2: retention ran during the run


def test_resume_reproduces_the_uninterrupted_run(dataset, tmp_path, clean_run):
    _, clean_history, _, _ = clean_run
    cfg = micro_config(dataset, str(tmp_path), name="clean", steps=40)
    interrupted = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    step = interrupted.restore()
    while step < 25:  # stop mid-way, as a crash would: the step-20 checkpoint is the last one
        step = interrupted.train_step(step)
    interrupted.checkpoints.wait()
    second, _ = train(cfg)
    resumed = losses(second)
    assert min(resumed) == 20  # started from the step-20 checkpoint, not from scratch
    expected = losses(clean_history, start=20)
    assert resumed.keys() == expected.keys()
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_torn_checkpoint_is_ignored(dataset, tmp_path):
    train(micro_config(dataset, str(tmp_path), name="torn", steps=20))
    store = CheckpointStore(str(tmp_path), "torn")
    assert store.latest_complete() == 20
    (tmp_path / "torn" / "checkpoints" / "step_00000020" / "_commit" / "rank-00000.json").unlink()
    assert store.latest_complete() == 10
    history, _ = train(micro_config(dataset, str(tmp_path), name="torn", steps=25))
    assert min(losses(history)) == 10


def _final_loss(history):
    loss = losses(history)
    return sum(loss[s] for s in sorted(loss)[-5:]) / 5


@pytest.mark.parametrize("kind", ["nan_loss", "grad_explode", "loss_spike"])
def test_single_fault_is_skipped(kind, dataset, tmp_path, clean_run):
    _, clean_history, _, _ = clean_run
    cfg = micro_config(dataset, str(tmp_path), name=kind, steps=40,
                       extra=[f"faults=[{{step: 23, kind: {kind}}}]", "guardian.skips_before_rollback=3"])
    history, guardian = train(cfg)
    actions = {h["step"]: h["action"] for h in history if "action" in h}
    assert actions[23] == "skip"
    assert [s for s, a in actions.items() if a != "continue"] == [23]
    assert not history[[h["step"] for h in history].index(23)]["applied"]
    assert abs(_final_loss(history) - _final_loss(clean_history)) < 0.15
    events = read_events(RunStore.for_run(cfg))
    assert any(e.get("event") == "skip" and e.get("step") == 23 for e in events)


def test_shuffled_labels_are_caught_once_the_model_has_learned_the_structure(tmp_path):
    """Shuffling targets within a row keeps its token counts, so it only shows once the model predicts from
    context: on patterned data it learns fast, the shuffle at step 30 is skipped, the run ends as clean."""
    dataset = make_patterned_dataset(tmp_path)
    clean, _ = train(micro_config(dataset, str(tmp_path / "clean"), name="clean", steps=40))
    cfg = micro_config(dataset, str(tmp_path / "shuffled"), name="shuffled", steps=40,
                       extra=["faults=[{step: 30, kind: shuffle_labels}]"])
    history, _ = train(cfg)
    actions = {h["step"]: h["action"] for h in history if h.get("action") not in (None, "continue")}
    assert actions == {30: "skip"}
    assert losses(clean)[29] < 1.5 and history[30]["loss"] > 2 * losses(clean)[29]
    assert abs(_final_loss(history) - _final_loss(clean)) < 0.1
    assert any(e.get("event") == "skip" and e.get("step") == 30 for e in read_events(RunStore.for_run(cfg)))


def test_spike_rolls_back_to_last_healthy_checkpoint_and_skips_the_window(dataset, tmp_path, clean_run):
    _, clean_history, _, _ = clean_run
    cfg = micro_config(dataset, str(tmp_path), name="rollback", steps=40,
                       extra=["faults=[{step: 25, kind: loss_spike}]", "guardian.skips_before_rollback=0",
                              "guardian.rollback_skip_batches=2"])
    history, guardian = train(cfg)
    rollbacks = [h for h in history if h.get("action") == "rollback"]
    # The last healthy checkpoint the guardian knew of: 20, unless its background commit was not yet seen at
    # step 25 (a loaded machine), then 10. Either way the newest one it had been told of.
    events = guardian.events
    at = next(i for i, e in enumerate(events) if e["event"] == "rollback")
    known = max(e["step"] for e in events[:at] if e["event"] == "checkpoint")
    assert known in (10, 20)
    assert len(rollbacks) == 1 and rollbacks[0]["to"] == known and rollbacks[0]["step"] == 25
    # The spike's batch and the 2 after it are skipped, visible in the data cursor.
    start, end = rollbacks[0]["skip"]
    assert start == 25 and end == 25 + 1 + 2  # healthy batches from the target on are replayed, the spike on is not
    assert (start, end) in [tuple(r) for r in guardian.skipped_ranges()]
    state = CheckpointStore(str(tmp_path), "rollback").read_json(40, "trainer_state.json")
    assert any(a <= start and end <= b for a, b in state["cursor"]["skip"])
    assert abs(_final_loss(history) - _final_loss(clean_history)) < 0.2
    assert all(math.isfinite(v) for v in losses(history).values())


def test_aborts_when_rollbacks_are_exhausted(dataset, tmp_path):
    cfg = micro_config(dataset, str(tmp_path), name="abort", steps=40,
                       extra=["faults=[{step: 25, kind: loss_spike}]", "guardian.skips_before_rollback=0",
                              "guardian.max_rollbacks=0"])
    with pytest.raises(GuardianAbort, match="rollback"):
        train(cfg)


@pytest.mark.slow
def test_s3_outage_during_a_save_loses_nothing_already_written(dataset, s3_server, s3_url):
    """The server stops while step 20 uploads, for longer than checkpoint.upload_retry_s: that checkpoint never
    becomes loadable, the error names the step, and the restarted run resumes from step 10 and finishes."""
    import threading

    cfg = micro_config(dataset, s3_url, name="outage", steps=30,
                       extra=[*s3_settings(s3_server), "faults=[{step: 19, kind: s3_outage}]",
                              "checkpoint.upload_retry_s=5"])

    def outage(step):
        s3_server.stop()
        threading.Timer(20.0, s3_server.start).start()

    trainer = build_trainer(cfg, WorkerEnv(hooks={"s3_outage": outage}), torch.device("cpu"),
                            guardian=Guardian(cfg.guardian))
    with pytest.raises(Exception, match=r"saving checkpoint step \d+ rank 0 to s3://.*failed"):
        trainer.fit()
    deadline = __import__("time").monotonic() + 60
    while not s3_server.ready and __import__("time").monotonic() < deadline:  # back, and serving what it holds
        __import__("time").sleep(1)
    store = CheckpointStore(s3_url, "outage", s3_server.s3_config())
    assert store.latest_complete() == 10
    restarted = build_trainer(cfg, WorkerEnv(hooks={"s3_outage": outage}), torch.device("cpu"),
                              guardian=Guardian(cfg.guardian))
    history = restarted.fit()["history"]  # the outage fired once: the marker keeps it from firing again
    assert min(losses(history)) == 10 and max(losses(history)) == 29
    assert store.latest_complete() == 30


def s3_settings(s3_server) -> list[str]:
    return [f"checkpoint.s3.endpoint_url={s3_server.endpoint_url}", "checkpoint.s3.region=us-east-1",
            f"checkpoint.s3.access_key_id={s3_server.access_key}",
            f"checkpoint.s3.secret_access_key={s3_server.secret_key}"]


@pytest.mark.slow
def test_an_s3_outage_shorter_than_the_retry_time_costs_no_restart(dataset, s3_server, s3_url, caplog):
    """With the preset's checkpoint settings (upload retries of 300 s), an outage of 8 s during the upload of
    step 20 delays that checkpoint: the run trains on, commits it and every later one, and never restarts."""
    import threading

    cfg = micro_config(dataset, s3_url, name="outage-retried", steps=30,
                       extra=[*s3_settings(s3_server), "faults=[{step: 19, kind: s3_outage}]"])
    assert cfg.checkpoint.upload_retry_s == load_config("tiny").checkpoint.upload_retry_s
    comeback: list[threading.Timer] = []

    def outage(step):
        s3_server.stop()
        comeback.append(threading.Timer(8.0, s3_server.start))
        comeback[-1].start()

    trainer = build_trainer(cfg, WorkerEnv(hooks={"s3_outage": outage}), torch.device("cpu"),
                            guardian=Guardian(cfg.guardian))
    history = trainer.fit()["history"]
    for timer in comeback:
        timer.join()
    assert comeback and sorted(losses(history)) == list(range(30))
    store = CheckpointStore(s3_url, "outage-retried", s3_server.s3_config())
    assert {20, 30} <= set(store.steps()) and store.latest_complete() == 30
    assert "checkpoint step 20 upload to" in caplog.text and "retrying for up to 300 s" in caplog.text


def test_every_committed_checkpoint_is_registered_even_one_committed_after_the_last_log_step(dataset, tmp_path):
    """Ray Train is told of checkpoints at log steps; one whose commit is seen later (a slow upload, or no log
    step in between) is told of at the end, before the final one."""
    cfg = micro_config(dataset, str(tmp_path), name="registered", steps=20,
                       extra=["train.log_every=100", "checkpoint.every_steps=5", "checkpoint.keep_last=10"])
    reported: list[int] = []
    env = WorkerEnv(registers_checkpoints=True,
                    report=lambda metrics, checkpoint_step=None: reported.append(checkpoint_step))
    build_trainer(cfg, env, torch.device("cpu")).fit()
    assert [s for s in reported if s is not None] == [5, 10, 15, 20]

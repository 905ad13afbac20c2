"""The driver's view: plain lines in a log (one per event, a step line every log_every), one redrawn bar on
a terminal; the monitor actor's catch-up after a restart."""

from __future__ import annotations

import io

from raytrainer.live.monitor import RunMonitor
from raytrainer.live.view import LiveView


def _step(s, action="continue", reason=None):
    return {"kind": "step", "step": s, "loss": 3.0, "perplexity": 20.1, "grad_norm": 0.5, "lr": 1e-3,
            "tokens_per_s": 12000.0, "mfu": 0.02, "step_time_s": 0.5, "action": action, "reason": reason}


def test_a_log_gets_a_line_per_event_and_every_log_every_steps():
    out = io.StringIO()
    view = LiveView(total_steps=100, log_every=10, out=out, tty=False)
    view.feed({"kind": "start", "step": 0, "world_size": 2, "steps": 100})
    for s in range(30):
        view.feed(_step(s, *(("skip", "loss spike") if s == 17 else ())))
    view.feed({"kind": "checkpoint", "step": 25, "url": "runs/tiny/checkpoints/step_00000025"})
    view.feed({"kind": "eval", "step": 25, "val_loss": 2.5, "val_perplexity": 12.2, "tokens": 1000, "time_s": 1.0})
    view.feed({"kind": "rollback", "step": 29, "to": 25, "skip": [29, 37], "reason": "3 anomalies"})
    view.feed({"kind": "finish", "step": 100, "tokens_seen": 819200})
    lines = out.getvalue().splitlines()
    assert lines[0] == "starting at step 0 of 100 on 2 workers"
    steps = [line for line in lines if line.startswith("step ") and "loss" in line and "val" not in line]
    assert [line.split()[1] for line in steps] == ["0/100", "10/100", "17/100", "20/100"]
    assert "[guardian: skip, loss spike]" in steps[2]
    assert "checkpoint at step 25 committed by every rank: runs/tiny/checkpoints/step_00000025" in lines
    assert any("val loss 2.5000" in line for line in lines)
    assert "step 29: ROLLED BACK to checkpoint 25 (3 anomalies); global batches 29..36 are skipped" in lines
    assert lines[-1] == "finished at step 100: 819,200 tokens trained on"
    assert len(lines) == 9
    assert "eta 39s" in steps[-1]  # 79 steps left at a median 0.5 s


def test_hardware_faults_and_stragglers_get_a_line_each():
    out = io.StringIO()
    view = LiveView(total_steps=100, log_every=10, out=out, tty=False)
    view.feed({"kind": "suspect_hardware", "step": 22, "ranks": [1], "nodes": ["node-b"], "exclude": ["node-b"]})
    view.feed({"kind": "straggler", "step": 40, "rank": 0, "node": "node-a", "own_s": 0.31})
    assert out.getvalue().splitlines() == [
        "step 22: a transient fault on rank 1 on node node-b (the step recomputed gave other numbers); the clean "
        "rerun was used; node node-b is EXCLUDED",
        "step 40: rank 0 on node node-a is a straggler (0.31 s of its own per step, slower than the others)"]


def test_a_terminal_gets_one_bar_and_the_events_above_it():
    out = io.StringIO()
    view = LiveView(total_steps=50, log_every=10, out=out, tty=True)
    for s in range(20):
        view.feed(_step(s))
    view.feed({"kind": "checkpoint", "step": 20, "url": "u"})
    view.close()
    text = out.getvalue()
    assert text.count("\n") == 2  # the checkpoint line and the newline that ends the bar
    last_bar = text.rsplit("\r\x1b[2K", 1)[-1]
    assert last_bar.startswith("[#########...............] 20/50") and "ckpt 20" in last_bar


def test_the_monitor_hands_out_each_record_once_and_survives_a_restart():
    monitor = RunMonitor(keep=5)
    for i in range(8):
        monitor.push({"i": i})
    records, seen = monitor.take(0)
    assert [r["i"] for r in records] == [3, 4, 5, 6, 7] and seen == 8  # the oldest were dropped
    assert monitor.take(seen) == ([], 8)
    restarted = RunMonitor()
    restarted.push({"i": 100})
    assert restarted.take(seen) == ([{"i": 100}], 1)  # the driver's count is past it: all of it is new


def test_a_pause_says_where_the_run_goes_on_and_a_later_resume_is_not_taken_for_a_silent_death():
    out = io.StringIO()
    view = LiveView(total_steps=100, log_every=10, out=out, tty=False)
    view.feed({"kind": "start", "step": 0, "world_size": 2, "steps": 100})
    view.say("Ctrl-C: every rank checkpoints at the end of its step")
    view.feed({"kind": "paused", "step": 13, "checkpoint": "runs/tiny/checkpoints/step_00000013",
               "reason": "Ctrl-C in the driver"})
    view.feed({"kind": "resume", "step": 13, "world_size": 2, "checkpoint": "runs/tiny/checkpoints/step_00000013"})
    assert out.getvalue().splitlines()[1:] == [
        "Ctrl-C: every rank checkpoints at the end of its step",
        "step 13: paused (Ctrl-C in the driver): checkpoint 13 is committed (runs/tiny/checkpoints/step_00000013); "
        "run the same command again to go on from it",
        "resumed at step 13 of 100 on 2 workers from runs/tiny/checkpoints/step_00000013"]


def test_ctrl_c_asks_for_a_pause_then_stops_at_once_then_leaves():
    import signal

    import pytest
    from ray.train.torch import TorchTrainer

    from raytrainer.live.pause import CTRL_C, CtrlC, pause_on_ctrl_c

    class Remote:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return type("Method", (), {"remote": lambda _, *a: self.calls.append((name, *a))})()

    monitor, controller, said = Remote(), Remote(), []
    ctrl_c = CtrlC(monitor, said.append)
    before = signal.getsignal(signal.SIGINT)
    ctrl_c.register(controller)
    assert signal.getsignal(signal.SIGINT) == ctrl_c.on_sigint
    ctrl_c.close()  # after fit(): Ctrl-C is Python's own again
    assert signal.getsignal(signal.SIGINT) is before
    ctrl_c.on_sigint(2, None)
    assert ctrl_c.paused and monitor.calls == [("request_pause", CTRL_C)] and controller.calls == []
    ctrl_c.on_sigint(2, None)
    assert ctrl_c.stopped_at_once and controller.calls == [("abort",)] and len(said) == 2
    with pytest.raises(SystemExit) as left:
        ctrl_c.on_sigint(2, None)
    assert left.value.code == 130
    # Ray Train 2.60's trainer has the hook this takes the place of (a Ray without it keeps its own Ctrl-C).
    assert callable(TorchTrainer._register_sigint_handler)
    trainer = TorchTrainer.__new__(TorchTrainer)
    assert pause_on_ctrl_c(trainer, monitor, said.append).register.__self__ is trainer._register_sigint_handler.__self__


def test_the_monitor_holds_the_first_pause_request():
    monitor = RunMonitor()
    assert monitor.pause_request() is None
    monitor.request_pause("Ctrl-C in the driver")
    monitor.request_pause("something else")
    assert monitor.pause_request() == "Ctrl-C in the driver"


def test_rank_0_asks_for_a_pause_at_most_once_a_second_and_never_waits_for_the_answer(monkeypatch):
    import ray

    from raytrainer.live import monitor as live_monitor

    clock, answers, asked = [100.0], {}, []

    class Actor:
        class pause_request:
            @staticmethod
            def remote():
                asked.append(clock[0])
                return len(asked)  # the question's ref

    monkeypatch.setattr(ray, "get_actor", lambda name, namespace: Actor)
    monkeypatch.setattr(ray, "wait", lambda refs, timeout: ([r for r in refs if r in answers], []))
    monkeypatch.setattr(ray, "get", lambda ref: answers[ref])
    monkeypatch.setattr(live_monitor.time, "monotonic", lambda: clock[0])
    poll = live_monitor.pause_requests("r", every_s=1.0)
    assert poll() is None and asked == [100.0]  # asked; the answer is not there yet
    clock[0] = 100.5
    assert poll() is None and asked == [100.0]  # still in flight: nothing waits, nothing more is asked
    answers[1] = None
    clock[0] = 100.7
    assert poll() is None and asked == [100.0]  # no request, and less than a second since the last question
    clock[0] = 101.2
    assert poll() is None and asked == [100.0, 101.2]
    answers[2] = "Ctrl-C in the driver"
    assert poll() == "Ctrl-C in the driver"

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

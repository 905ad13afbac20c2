"""The driver's view of a run, drawn from the records rank 0 announces (see raytrainer.metrics.sinks for
their kinds). On a terminal: one progress bar, with events printed above it as they happen. In a log
(`ray job logs`, a file, CI): plain lines, a step line every `train.log_every` steps, one line per event.
"""

from __future__ import annotations

import shutil
import sys
import threading
from typing import Any, TextIO

BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _rate(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else (f"{value / 1e3:.1f}k" if value >= 1e4 else f"{value:.0f}")


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "nan"


class LiveView:
    def __init__(self, total_steps: int, log_every: int, out: TextIO | None = None, tty: bool | None = None):
        self.total = total_steps
        self.log_every = log_every
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.step = 0
        self.last: dict = {}
        self.val_loss: float | None = None
        self.checkpoint: int | None = None
        self.counts = {"skip": 0, "rollback": 0}
        self._step_times: list[float] = []
        self._bar_shown = False
        self._attempt_open = False  # an attempt started and has not said how it ended
        self._logged: dict[str, set] = {}  # worker log lines already printed, and which ranks said them

    # ---- records in

    def feed(self, record: dict) -> None:
        line = self.line_for(record)
        if line is not None:
            self.say(line)
        elif self.tty:
            self._draw_bar()

    def say(self, line: str) -> None:
        """A line above the bar: a record's, or the driver's own (Ctrl-C)."""
        self._print(line)
        if self.tty:
            self._draw_bar()

    def line_for(self, r: dict) -> str | None:
        """The plain line a record is worth (None: only the bar changes), and the view's state updated."""
        kind = r.get("kind")
        if kind == "step":
            return self._on_step(r)
        if kind == "eval":
            self.val_loss = r.get("val_loss")
            return (f"step {r['step']:>6}/{self.total}  val loss {_num(r.get('val_loss'), '.4f')}  "
                    f"val ppl {_num(r.get('val_perplexity'), '.1f')}  ({r.get('tokens', 0):,} tokens, "
                    f"{_num(r.get('time_s'), '.1f')}s)")
        if kind == "checkpoint":
            self.checkpoint = r["step"]
            return f"checkpoint at step {r['step']} committed by every rank: {r.get('url', '')}"
        if kind == "rollback":
            self.counts["rollback"] += 1
            self.step = r["to"]
            skip = r.get("skip")
            skipped = f"; global batches {skip[0]}..{skip[1] - 1} are skipped" if skip else ""
            return f"step {r['step']}: ROLLED BACK to checkpoint {r['to']} ({r.get('reason', '')}){skipped}"
        if kind in ("stopped", "abort", "finish", "paused"):
            self._attempt_open = False
        if kind == "start":
            self._attempt_open = True
            self.step = r.get("step", 0)
            branch = f", branched from {r['branched_from']}" if r.get("branched_from") else ""
            return (f"starting at step {self.step} of {r.get('steps', self.total)} on {r.get('world_size')} "
                    f"workers{branch}")
        if kind == "resume":
            self.step = r["step"]
            died = ("the last attempt ended without a word (a killed process or a lost node; Ray's logs are in "
                    "/tmp/ray/session_latest/logs): " if self._attempt_open else "")
            self._attempt_open = True
            return (f"{died}resumed at step {r['step']} of {r.get('steps', self.total)} on {r.get('world_size')} "
                    f"workers from {r.get('checkpoint')}")
        if kind == "preempted":
            nodes = f" on node(s) {', '.join(r['nodes'])}" if r.get("nodes") else ""
            return (f"step {r.get('step')}: rank(s) {', '.join(map(str, r.get('ranks', [])))}{nodes} were told to stop "
                    f"({r.get('reason')}); the whole group checkpointed in {_num(r.get('save_s'), '.3g')} s and "
                    "restarts from it")
        if kind == "paused":
            return (f"step {r.get('step')}: paused ({r.get('reason')}): checkpoint {r.get('step')} is committed "
                    f"({r.get('checkpoint')}); run the same command again to go on from it")
        if kind == "stopped":
            return (f"step {r.get('step')}: this attempt stopped ({r.get('reason')}); Ray Train restarts the "
                    "workers from the newest complete checkpoint, unless parallel.max_failures is spent")
        if kind == "log":
            return self._on_log(r)
        if kind == "suspect_hardware":
            where = ", ".join(f"rank {rank}" for rank in r.get("ranks", [])) or "no single rank"
            nodes = f" on node {', '.join(r['nodes'])}" if r.get("nodes") else ""
            excluded = f"; node {', '.join(r['exclude'])} is EXCLUDED" if r.get("exclude") else ""
            return (f"step {r.get('step')}: a transient fault on {where}{nodes} (the step recomputed gave other "
                    f"numbers); the clean rerun was used{excluded}")
        if kind == "blame":
            docs = "; ".join(f"document {d.get('doc')} ({d.get('shard')} row {d.get('shard_row')}: "
                             f"{(d.get('text') or '')[:40]!r})" for d in r.get("documents", []))
            return f"step {r.get('step')}: the spike is in the data: {docs} blacklisted, the update skipped"
        if kind == "straggler":
            node = f" on node {r['node']}" if r.get("node") else ""
            own = _num(r.get("own_s"), ".3g")
            return f"step {r.get('step')}: rank {r.get('rank')}{node} is a straggler ({own} s of its own per step, " \
                   "slower than the others)"

        if kind == "abort":
            return f"step {r.get('step')}: the guardian ABORTED the run: {r.get('reason')}"
        if kind == "finish":
            return f"finished at step {r['step']}: {r.get('tokens_seen', 0):,} tokens trained on"
        return None

    def _on_log(self, r: dict) -> str | None:
        # Every rank may say the same thing (a data warning, a storage error): print it once, from the first.
        text = f"{r.get('level')} {r.get('logger')}: {r.get('message')}"
        ranks = self._logged.setdefault(text, set())
        ranks.add(r.get("rank"))
        if len(ranks) > 1:
            return None
        return f"rank {r.get('rank')}: {text}"

    def _on_step(self, r: dict) -> str | None:
        self.step = r["step"] + 1
        self.last = r
        if isinstance(r.get("step_time_s"), int | float):
            self._step_times = (self._step_times + [r["step_time_s"]])[-50:]
        action = r.get("action", "continue")
        if action == "skip":
            self.counts["skip"] += 1
        due = r["step"] % self.log_every == 0 or r["step"] == self.total - 1
        if not (due or action != "continue") or (self.tty and action == "continue"):
            return None
        note = "" if action == "continue" else f"  [guardian: {action}, {r.get('reason')}]"
        return (f"step {r['step']:>6}/{self.total}  loss {_num(r.get('loss'), '.4f')}  "
                f"ppl {_num(r.get('perplexity'), '.1f')}  gnorm {_num(r.get('grad_norm'), '.3f')}  "
                f"lr {_num(r.get('lr'), '.2e')}  tok/s {_rate(r.get('tokens_per_s', 0.0))}  "
                f"mfu {100 * r.get('mfu', 0.0):.1f}%  eta {_duration(self.eta_s())}{note}")

    def eta_s(self) -> float:
        if not self._step_times:
            return 0.0
        median = sorted(self._step_times)[len(self._step_times) // 2]
        return median * max(self.total - self.step, 0)

    # ---- drawing

    def bar(self) -> str:
        done = min(self.step, self.total)
        filled = int(BAR_WIDTH * done / max(self.total, 1))
        r = self.last
        parts = [f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{self.total}",
                 f"loss {_num(r.get('loss'), '.3f')}"]
        if self.val_loss is not None:
            parts.append(f"val {self.val_loss:.3f}")
        parts += [f"tok/s {_rate(r.get('tokens_per_s', 0.0))}", f"mfu {100 * r.get('mfu', 0.0):.1f}%",
                  f"eta {_duration(self.eta_s())}"]
        if self.checkpoint is not None:
            parts.append(f"ckpt {self.checkpoint}")
        if self.counts["skip"] or self.counts["rollback"]:
            parts.append(f"guardian {self.counts['skip']} skips {self.counts['rollback']} rollbacks")
        return "  ".join(parts)

    def _print(self, line: str) -> None:
        if self.tty and self._bar_shown:
            self.out.write("\r\x1b[2K")  # clear the bar, print the event, draw the bar again below it
        self.out.write(line + "\n")
        self.out.flush()
        self._bar_shown = False

    def _draw_bar(self) -> None:
        width = shutil.get_terminal_size((120, 24)).columns
        self.out.write("\r\x1b[2K" + self.bar()[: width - 1])
        self.out.flush()
        self._bar_shown = True

    def close(self) -> None:
        if self.tty and self._bar_shown:
            self.out.write("\n")
            self.out.flush()
            self._bar_shown = False


class Follower:
    """A driver thread that takes new records from the run's monitor twice a second and draws them."""

    def __init__(self, monitor: Any, view: LiveView, interval_s: float = 0.5):
        self.monitor = monitor
        self.view = view
        self.interval_s = interval_s
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def _poll(self) -> None:
        import ray

        try:
            records, self._seen = ray.get(self.monitor.take.remote(self._seen), timeout=10)
        except Exception:  # the monitor restarting: the next poll catches up
            return
        for record in records:
            self.view.feed(record)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def stop(self) -> None:
        """Draw what is left, then stop."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        self.view.close()

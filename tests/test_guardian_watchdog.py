"""The step watchdog ends a stuck process with its own exit code and stays quiet otherwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from raytrainer.fault.watchdog import WATCHDOG_EXIT_CODE, StepWatchdog

STUCK = textwrap.dedent("""
    import time
    from raytrainer.fault.watchdog import StepWatchdog
    watchdog = StepWatchdog(timeout_s=0.5, rank=3)
    for step in range(5, 8):
        with watchdog.step(step):
            time.sleep(60 if step == 7 else 0.05)  # step 7 hangs, as in a collective whose peer died
    print("not reached")
""")

QUIET = textwrap.dedent("""
    import time
    from raytrainer.fault.watchdog import StepWatchdog
    watchdog = StepWatchdog(timeout_s=0.5, rank=1)
    for step in range(10):
        with watchdog.step(step):
            time.sleep(0.1)
    time.sleep(1.0)  # idle between steps (a checkpoint save) is not watched
    watchdog.close()
    print("done")
""")


def _run(code: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


def test_watchdog_exits_a_stuck_step_with_its_code_naming_rank_and_step():
    proc, elapsed = _run(STUCK)
    assert proc.returncode == WATCHDOG_EXIT_CODE, proc.stderr
    assert "rank 3 stuck in step 7" in proc.stderr and "guardian.step_timeout_s=0.5" in proc.stderr
    assert "not reached" not in proc.stdout
    assert "time.sleep" in proc.stderr or "File" in proc.stderr  # the stacks are dumped
    assert elapsed < 30


def test_watchdog_stays_quiet_when_steps_finish_in_time():
    proc, _ = _run(QUIET)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done" and "stuck" not in proc.stderr


def test_watchdog_in_process_with_a_fake_exit():
    codes = []
    watchdog = StepWatchdog(timeout_s=0.2, rank=0, exit_fn=codes.append)
    with watchdog.step(1):
        time.sleep(0.05)
    assert codes == []
    with watchdog.step(2):
        time.sleep(0.6)
    assert codes == [WATCHDOG_EXIT_CODE] and watchdog.fired
    with watchdog.step(3, timeout_s=5.0):  # a per-step override, e.g. for a first step that compiles
        time.sleep(0.3)
    assert codes == [WATCHDOG_EXIT_CODE]
    watchdog.close()

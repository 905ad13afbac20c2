"""`raytrainer report`: report.md and a self-contained report.html with plots that show the run, rollbacks
marked; `--compare` overlays runs; a run without metrics says what is missing."""

from __future__ import annotations

import base64
import io
import math
import re

import numpy as np
import pytest

from raytrainer.cli import main
from raytrainer.metrics import RunHistory
from raytrainer.metrics.history import build_history
from raytrainer.metrics.sinks import JsonlSink
from raytrainer.report import plots
from raytrainer.storage import open_storage


def _pixels(png: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


def _step(s: int, t: float, skip: bool = False) -> dict:
    return {"kind": "step", "step": s, "loss": 5.0 * math.exp(-s / 20) + 1.0, "lr": 1e-3 * min(1, s / 10),
            "grad_norm": 1.0 + 0.1 * s, "tokens_per_s": 1000.0 + s, "mfu": 0.01, "tokens": 1024,
            "tokens_seen": 1024 * (s + 1), "applied": not skip, "action": "skip" if skip else "continue",
            "flops": 1e9, "attempt": "a", "time": t}


def _records(rollback: bool = True) -> list[dict]:
    """60 steps; with `rollback`, a skip at 30 and a rollback at 45 to 20, after which 20..59 run again."""
    out = [{"kind": "start", "step": 0, "world_size": 2, "steps": 60, "attempt": "a", "time": 1000.0}]
    for s in range(45 if rollback else 60):
        out.append(_step(s, 1000.0 + s, skip=rollback and s == 30))
        if s % 20 == 0:
            out.append({"kind": "eval", "step": s, "val_loss": 5.0 * math.exp(-s / 20) + 1.2,
                        "val_perplexity": 1.0, "attempt": "a", "time": 1000.0 + s})
    if rollback:
        out.append({"kind": "rollback", "step": 45, "to": 20, "abandoned": [20, 45], "reason": "loss spike",
                    "attempt": "a", "time": 1046.0})
        out += [_step(s, 1100.0 + s) for s in range(20, 60)]
    out.append({"kind": "finish", "step": 60, "tokens_seen": 60 * 1024, "attempt": "a", "time": 1200.0})
    return out


def _write_run(storage, records):
    JsonlSink(storage, "20261202T000000Z-aaaa").write(records)


def test_the_loss_plot_shows_the_curve_and_marks_the_rollback():
    empty = _pixels(plots.loss_plot(RunHistory()))
    with_rollback = _pixels(plots.loss_plot(build_history(_records(rollback=True))))
    without = _pixels(plots.loss_plot(build_history(_records(rollback=False))))
    assert empty.shape == with_rollback.shape
    differ = np.abs(with_rollback - empty).sum(axis=-1) > 0.1
    assert differ.mean() > 0.02, differ.mean()  # the curve is drawn, not an empty frame
    # Rollback and skip marks are red (tab:red is (0.84, 0.15, 0.16)); a run without them has less red.
    def red(img):
        return int(((img[..., 0] > 0.7) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)).sum())
    assert red(with_rollback) > red(without) + 50


def test_report_writes_markdown_and_self_contained_html(tmp_path, capsys):
    run = open_storage(str(tmp_path / "runs" / "r1"))
    _write_run(run, _records())
    assert main(["report", "--run", str(tmp_path / "runs" / "r1")]) == 0
    out = capsys.readouterr().out
    report_dir = tmp_path / "runs" / "r1" / "report"
    assert f"wrote {report_dir / 'report.html'}" in out
    md = (report_dir / "report.md").read_text()
    assert "| rollbacks | 1 (25 steps abandoned) |" in md
    assert "| skipped updates | 0 |" in md  # the skip at 30 was on the abandoned branch
    assert "| status | finished at step 60 |" in md
    assert "![loss](loss.png)" in md
    for name in ("loss.png", "lr.png", "grad_norm.png", "throughput.png"):
        assert (report_dir / name).stat().st_size > 5000, name
    page = (report_dir / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4 and "src='loss.png'" not in page  # inlined: one file to mail around
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_overlays_two_runs(tmp_path):
    for name, rollback in (("a", True), ("b", False)):
        _write_run(open_storage(str(tmp_path / "runs" / name)), _records(rollback))
    out = tmp_path / "cmp"
    assert main(["report", "--compare", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b"),
                 "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "# Comparison: a vs b" in md and "| a | 60 |" in md and "| b | 60 |" in md
    assert (out / "loss.png").stat().st_size > 5000


def test_a_run_without_metrics_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert main(["report", "--run", str(tmp_path / "runs" / "empty")]) == 2  # an empty directory is no run
    assert "no run there" in capsys.readouterr().err
    (tmp_path / "runs" / "empty" / "config.json").write_text("{}")  # started, but no step recorded yet
    assert main(["report", "--run", str(tmp_path / "runs" / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no metrics in" in err and "runs/empty/metrics" in err and "flush" in err


@pytest.mark.parametrize("records", [[], [{"kind": "start", "step": 0}]])
def test_history_of_a_run_that_never_stepped(records):
    history = build_history(records)
    assert history.steps == [] and (history.empty == (not records))


def test_the_report_names_suspect_hardware_excluded_nodes_and_stragglers(tmp_path):
    from raytrainer.fault.events import EventLog, RunStore

    root = tmp_path / "runs" / "hw"
    _write_run(open_storage(str(root)), _records(rollback=False))
    log = EventLog(RunStore.local(root / "guardian"))
    for event in ({"event": "suspect_hardware", "step": 22, "ranks": [1], "nodes": ["node-b"],
                   "reason": "step 22 gave loss 3 then 3.1: a transient fault on rank 1 on node node-b"},
                  {"event": "exclude_node", "step": 31, "node": "node-b", "reason": "2 transient faults on node-b"},
                  {"event": "straggler", "step": 40, "rank": 0, "node": "node-a", "reason": "rank 0 is slow"},
                  # as the guardian wrote it before recoveries carried a reason: the report is still drawn
                  {"event": "straggler_recovered", "step": 60, "rank": 0, "node": "node-a"}):
        log.append(event)
    log.flush()
    assert main(["report", "--run", str(root)]) == 0
    md = (root / "report" / "report.md").read_text()
    section = md.split("## Hardware")[1]
    assert "| 22 | suspect_hardware | rank 1 | node-b |" in section
    assert "| 31 | exclude_node | - | node-b |" in section and "| 40 | straggler | rank 0 | node-a |" in section
    assert "| 60 | straggler_recovered | rank 0 | node-a | - |" in section


def test_a_paused_run_says_so_and_that_it_resumes():
    from raytrainer.report.document import summary_lines

    records = _records(rollback=False)[:-1] + [{"kind": "paused", "step": 60, "reason": "Ctrl-C in the driver",
                                                "attempt": "a", "time": 1200.0}]
    lines = summary_lines(build_history(records), {"train": {"steps": 100}}, None)
    assert "| status | paused at step 60 (Ctrl-C in the driver); resumes when submitted again |" in lines


def test_a_report_piped_into_head_ends_quietly(tmp_path):
    """`raytrainer report ... | head`: the reader goes before the report is written out."""
    import subprocess
    import sys

    run = tmp_path / "runs" / "r1"
    _write_run(open_storage(str(run)), _records())
    code = "import sys; from raytrainer.cli import main; sys.exit(main())"
    job = subprocess.Popen([sys.executable, "-c", code, "report", "--run", str(run)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    job.stdout.close()  # long before the report is printed
    err = job.stderr.read()
    assert job.wait(timeout=120) == 0 and "Error" not in err, err
    assert (run / "report" / "report.html").is_file()  # the report was still written

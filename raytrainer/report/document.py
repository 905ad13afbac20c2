"""report.md and a self-contained report.html (plots inlined) for one run, or a comparison of runs.

Written into the run's storage at `<run>/report/` at the end of every run, and on demand by
`raytrainer report --run RUN` (also during one: it reads whatever has been flushed).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml

from raytrainer.fault.events import RunStore, read_events
from raytrainer.metrics import RunHistory, read_history
from raytrainer.metrics.sinks import METRICS_DIR
from raytrainer.report import plots
from raytrainer.storage import Storage

REPORT_DIR = "report"
CONFIG_FILE = "config.json"


class ReportError(ValueError):
    """A report cannot be made, and why."""


@dataclass
class Document:
    title: str
    sections: list[tuple[str, list[str]]] = field(default_factory=list)  # (heading, markdown lines)
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for heading, lines in self.sections:
            out += [f"## {heading}", "", *lines, ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for heading, lines in self.sections:
            body.append(f"<h2>{html.escape(heading)}</h2>")
            body.append(_markdown_to_html(lines, self.images))
        style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
                 "pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")

    def write(self, out: Storage) -> list[str]:
        for name, png in self.images.items():
            out.write_bytes(name, png)
        out.write_bytes("report.md", self.markdown().encode())
        out.write_bytes("report.html", self.html().encode())
        return [out.uri("report.md"), out.uri("report.html")]


def _markdown_to_html(lines: list[str], images: dict[str, bytes]) -> str:
    """The small subset of markdown these reports use: tables, images, code blocks, bullets, paragraphs."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = lines.index("```", i + 1)
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:end])) + "</pre>")
            i = end + 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|-: "):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, *rest = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
                       + "</table>")
            continue
        if line.startswith("!["):
            alt, name = line[2:].split("](", 1)
            name = name.rstrip(")")
            data = base64.b64encode(images[name]).decode()
            out.append(f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec) if isinstance(value, int | float) else "-"


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "-"


def _duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s"


def require_metrics(history: RunHistory, run: Storage) -> None:
    if history.empty:
        raise ReportError(
            f"no metrics in {run.uri(METRICS_DIR)}: the run has not recorded a step yet (rank 0 flushes every "
            "metrics.flush_every_s seconds and at each checkpoint), or it predates metrics on record; "
            f"`raytrainer report --run {run.url} --json` still lists its checkpoints and guardian decisions")


def run_document(run: Storage, checkpoints: list[dict] | None = None) -> Document:
    history = read_history(run)
    require_metrics(history, run)
    events = read_events(RunStore(run.fs, run.path("guardian")))
    guardian = [e for e in events if e.get("event") in ("skip", "rollback", "abort", "rollback_fallback")]
    hardware = [e for e in events if e.get("event") in HARDWARE_EVENTS]
    blamed = [e for e in events if e.get("event") == "blame"]
    config = _read_config(run)
    doc = Document(f"Run report: {run.url}")
    doc.sections.append(("Summary", summary_lines(history, config, checkpoints)))
    doc.images = plots.run_plots(history)
    doc.sections.append(("Curves", ["![loss](loss.png)", "![learning rate](lr.png)", "![grad norm](grad_norm.png)",
                                    "![tokens/s and MFU](throughput.png)"]))
    if history.evals:
        doc.sections.append(("Validation", ["| step | val loss | val ppl |", "|---|---|---|"] + [
            f"| {e['step']} | {_fmt(e.get('val_loss'))} | {_fmt(e.get('val_perplexity'), '.2f')} |"
            for e in history.evals]))
    doc.sections.append(("Guardian decisions", _guardian_lines(guardian)))
    doc.sections.append(("Blamed documents (blacklisted)", _blame_lines(blamed)))
    doc.sections.append(("Hardware: transient faults, excluded nodes, stragglers", _hardware_lines(hardware)))
    doc.sections.append(("Recovery events", _event_lines(history)))
    if checkpoints is not None:
        doc.sections.append(("Checkpoints", ["| step | complete | world size | pinned |", "|---|---|---|---|"] + [
            f"| {c['step']} | {'yes' if c['complete'] else 'no: ' + '; '.join(c['problems'][:1])} | "
            f"{c['world_size']} | {'yes' if c['pinned'] else ''} |" for c in checkpoints]))
    doc.sections.append(("Config", ["```", yaml.safe_dump(config, sort_keys=False).rstrip() if config
                                     else f"(no {CONFIG_FILE} in the run's storage)", "```"]))
    return doc


def summary_lines(history: RunHistory, config: dict | None, checkpoints: list[dict] | None) -> list[str]:
    steps = history.steps
    last = steps[-1] if steps else {}
    times = [r["time"] for r in steps + history.events + history.evals if isinstance(r.get("time"), int | float)]
    total = (config or {}).get("train", {}).get("steps")
    ends = [e for e in history.events if e.get("kind") in ("finish", "stopped", "abort", "paused")]
    status = "in progress"
    if ends:
        end = ends[-1]
        status = {"finish": f"finished at step {end['step']}",
                  "abort": f"aborted by the guardian at step {end['step']}: {end.get('reason')}",
                  "paused": f"paused at step {end['step']} ({end.get('reason')}); resumes when submitted again"}.get(
            end["kind"], f"stopped at step {end['step']}: {end.get('reason')}")
    flops = sum(r.get("flops") or 0.0 for r in steps if r.get("applied"))
    spent = flops + sum(r.get("flops") or 0.0 for r in history.abandoned)
    best_val = min((e["val_loss"] for e in history.evals if isinstance(e.get("val_loss"), float)), default=None)
    lines = [
        "| | |", "|---|---|",
        f"| status | {status} |",
        f"| steps recorded | {len(steps)}{f' of {total}' if total else ''} |",
        f"| final train loss | {_fmt(last.get('loss'))} (step {last.get('step', '-')}) |",
        f"| best validation loss | {_fmt(best_val)} |",
        f"| tokens trained on | {last.get('tokens_seen', 0):,} |",
        f"| training FLOPs | {flops:.3e} ({spent:.3e} spent, abandoned steps included) |",
        f"| wall time | {_duration(max(times) - min(times)) if times else '-'} "
        f"({_when(min(times) if times else None)} to {_when(max(times) if times else None)}) |",
        f"| attempts | {len(history.attempts)} |",
        f"| skipped updates | {sum(1 for r in steps if r.get('action') == 'skip')} |",
        f"| rollbacks | {len(history.of_kind('rollback'))} ({len(history.abandoned)} steps abandoned) |",
        f"| median tokens/s | {_fmt(_median(r.get('tokens_per_s') for r in steps), ',.0f')} |",
        f"| median MFU | {_fmt(100 * (_median(r.get('mfu') for r in steps) or 0.0), '.2f')}% |",
    ]
    if checkpoints is not None:
        complete = [c["step"] for c in checkpoints if c["complete"]]
        lines.append(f"| checkpoints kept | {len(checkpoints)} (latest complete: {max(complete, default='none')}) |")
    return lines


def _median(values) -> float | None:
    vals = sorted(v for v in values if isinstance(v, int | float) and math.isfinite(v))
    return vals[len(vals) // 2] if vals else None


def _guardian_lines(events: list[dict]) -> list[str]:
    if not events:
        return ["The guardian never intervened."]
    return ["| step | decision | reason |", "|---|---|---|"] + [
        f"| {e.get('step')} | {e['event']}{' to ' + str(e['rollback_to']) if e.get('rollback_to') is not None else ''}"
        f" | {str(e.get('reason', '')).splitlines()[0] if e.get('reason') else ''} |" for e in events]


def _blame_lines(events: list[dict]) -> list[str]:
    """Each document a reproduced spike was blamed on: where it is stored and how it begins."""
    if not events:
        return ["No spike was blamed on documents."]
    rows = [f"| {e.get('step')} | {d.get('doc')} | {d.get('shard')} | {d.get('shard_row')} | "
            f"{_fmt(d.get('mean_loss'), '.3f')} | {_fmt(e.get('loss_without'), '.3f')} | "
            f"{_cell(d.get('text') or '')} |" for e in events for d in e.get("documents", [])]
    return ["| step | document | shard | row | its loss | batch loss without it | text |",
            "|---|---|---|---|---|---|---|", *rows]


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


HARDWARE_EVENTS = ("suspect_hardware", "exclude_node", "straggler", "straggler_recovered")


def _hardware_lines(events: list[dict]) -> list[str]:
    """What the reruns and the straggler watch found: which rank, which node, and what happened next."""
    if not events:
        return ["No transient fault, excluded node or straggler."]
    rows = []
    for e in events:
        kind = e["event"]
        if kind == "suspect_hardware":
            where = ", ".join(f"rank {r}" for r in e.get("ranks", [])) or "no single rank"
            nodes = ", ".join(e.get("nodes") or []) or "-"
        else:
            where, nodes = (f"rank {e['rank']}" if "rank" in e else "-"), e.get("node") or "-"
        detail = (str(e.get("reason") or "").splitlines() or ["-"])[0]  # an event may carry no reason
        rows.append(f"| {e.get('step')} | {kind} | {where} | {nodes} | {detail} |")
    return ["| step | event | rank | node | detail |", "|---|---|---|---|---|", *rows]


def _event_lines(history: RunHistory) -> list[str]:
    rows = []
    for e in history.events:
        kind = e.get("kind")
        if kind == "rollback":
            rows.append(f"| {_when(e.get('time'))} | rollback | step {e['step']} to {e['to']}: {e.get('reason', '')} |")
        elif kind in ("start", "resume"):
            where = f" from {e.get('checkpoint') or e.get('branched_from')}" if e.get("checkpoint") or e.get(
                "branched_from") else ""
            rows.append(f"| {_when(e.get('time'))} | {kind} | step {e['step']} on {e.get('world_size')} workers"
                        f"{where} |")
        elif kind in ("stopped", "finish", "abort", "paused"):
            rows.append(f"| {_when(e.get('time'))} | {kind} | step {e['step']} {e.get('reason', '')} |")
    return ["| time | event | detail |", "|---|---|---|", *rows] if rows else ["None."]


def compare_document(runs: dict[str, Storage]) -> Document:
    histories = {}
    for name, run in runs.items():
        histories[name] = read_history(run)
        require_metrics(histories[name], run)
    doc = Document("Comparison: " + " vs ".join(runs))
    rows = ["| run | steps | final loss | best val loss | tokens | median tokens/s |", "|---|---|---|---|---|---|"]
    for name, h in histories.items():
        last = h.steps[-1] if h.steps else {}
        best = min((e["val_loss"] for e in h.evals if isinstance(e.get("val_loss"), float)), default=None)
        rate = _median(r.get("tokens_per_s") for r in h.steps)
        rows.append(f"| {name} | {len(h.steps)} | {_fmt(last.get('loss'))} | {_fmt(best)} | "
                    f"{last.get('tokens_seen', 0):,} | {_fmt(rate, ',.0f')} |")
    doc.sections.append(("Runs", rows))
    doc.images = plots.compare_plots(histories)
    doc.sections.append(("Curves", ["![loss](loss.png)", "![learning rate](lr.png)", "![tokens/s](throughput.png)"]))
    return doc


def _read_config(run: Storage) -> dict | None:
    try:
        return json.loads(run.read_bytes(CONFIG_FILE))
    except (FileNotFoundError, OSError, ValueError):
        return None


def write_config(run: Storage, config: dict) -> None:
    """The run's (redacted) config beside its checkpoints, for reports."""
    run.write_bytes(CONFIG_FILE, json.dumps(config, indent=1).encode())


def write_run_report(run: Storage, checkpoints: list[dict] | None = None) -> list[str]:
    return run_document(run, checkpoints).write(run.child(REPORT_DIR))

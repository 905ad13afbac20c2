"""What happened in a run: its checkpoints and the guardian's decisions (`raytrainer report | inspect`)."""

from __future__ import annotations

from typing import Any

from raytrainer.checkpoint import CheckpointStore
from raytrainer.config import ConfigError, S3Config
from raytrainer.fault.events import RunStore, read_events
from raytrainer.storage import StorageError, explain_storage_error, open_filesystem, open_storage

RUNS_NAMED = 10  # sibling runs named when --run finds nothing


class RunNotFound(ConfigError):
    """--run names a place that holds no run, or no checkpoint that can be read."""


def split_run_url(run_url: str) -> tuple[str, str]:
    """`<checkpoint.storage>/<run.name>` -> (storage, run name)."""
    run_url = run_url.rstrip("/")
    if "/" not in run_url:
        raise RunNotFound(f"--run {run_url!r}: expected <checkpoint.storage>/<run.name>, e.g. runs/tiny")
    storage, name = run_url.rsplit("/", 1)
    return storage, name


def require_run(run_url: str, s3: S3Config | None = None) -> None:
    """Raise RunNotFound, naming the runs beside it, when nothing is stored under run_url (a typo in --run is
    otherwise read as an empty run), and StorageError when the store cannot be listed."""
    storage, name = split_run_url(run_url)
    parent = open_storage(storage, s3)
    try:
        if parent.listdir(name):
            return
        runs = [n for n in parent.listdir() if not n.startswith(".") and n != name]
    except OSError as e:
        _, reason = explain_storage_error(e)
        raise StorageError(f"{run_url}: cannot list it: {reason}; for s3:// give the endpoint (--endpoint-url, or "
                           "--set checkpoint.s3.endpoint_url=... for export and generate) and credentials "
                           "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)", url=run_url) from e
    beside = (f"runs in {parent.uri()}: {', '.join(runs[:RUNS_NAMED])}{' ...' if len(runs) > RUNS_NAMED else ''}"
              if runs else f"no other run in {parent.uri()}")
    raise RunNotFound(f"{run_url}: no run there (nothing under {parent.uri(name)}); {beside}. A run's directory "
                      "is <checkpoint.storage>/<run.name>, e.g. runs/tiny")


def pick_checkpoint(run_url: str, step: int | None = None, s3: S3Config | None = None
                    ) -> tuple[CheckpointStore, int]:
    """(store, step) of the checkpoint to read: `step`, or the newest complete one; RunNotFound, saying what is
    there instead, when that is no complete checkpoint."""
    require_run(run_url, s3)
    store = CheckpointStore(*split_run_url(run_url), s3)
    chosen = store.latest_complete() if step is None else step if store.is_complete(step) else None
    if chosen is not None:
        return store, chosen
    listing = store.list()
    complete = [c.step for c in listing if c.complete]
    unusable = [c for c in listing if not c.complete]
    what = f"step {step} is not a complete checkpoint" if step is not None else "no complete checkpoint"
    found = f"complete steps: {', '.join(map(str, complete[-5:]))}" if complete else "no complete step"
    if unusable:
        found += (f"; {len(unusable)} unusable (step {unusable[-1].step}: "
                  f"{'; '.join(unusable[-1].problems[:2]) or 'incomplete'})")
    raise RunNotFound(f"{run_url}: {what} ({found}); `raytrainer inspect --run {run_url}` lists them")


def open_run(run_url: str, s3: S3Config | None = None) -> tuple[CheckpointStore, RunStore]:
    storage, name = split_run_url(run_url)
    store = CheckpointStore(storage, name, s3)
    fs, path = open_filesystem(f"{run_url}/guardian", s3)
    return store, RunStore(fs, path)


def run_report(run_url: str, s3: S3Config | None = None) -> dict[str, Any]:
    require_run(run_url, s3)
    store, guardian_store = open_run(run_url, s3)
    checkpoints = store.list()
    latest = store.latest_complete()
    state = store.read_json(latest, "trainer_state.json") if latest is not None else None
    events = read_events(guardian_store)
    decisions = [e for e in events if e.get("event") in ("skip", "rollback", "abort")]
    return {
        "run": run_url,
        "latest_complete": latest,
        "checkpoints": [
            {"step": c.step, "complete": c.complete, "world_size": c.world_size, "pinned": c.pinned,
             "where": c.location, "problems": c.problems}
            for c in checkpoints
        ],
        "last_metrics": (state or {}).get("metrics", {}),
        "cursor": (state or {}).get("cursor"),
        "guardian_events": events,
        "interventions": {a: sum(1 for e in decisions if e["event"] == a) for a in ("skip", "rollback", "abort")},
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"run {report['run']}", f"latest complete checkpoint: {report['latest_complete']}"]
    for c in report["checkpoints"]:
        status = "complete" if c["complete"] else "INCOMPLETE (" + "; ".join(c["problems"][:2]) + ")"
        pin = " pinned" if c["pinned"] else ""
        lines.append(f"  step {c['step']:>8}  {status}  world {c['world_size']}{pin}  [{c['where']}]")
    m = report["last_metrics"]
    if m:
        lines.append(f"last step {m.get('step')}: loss {m.get('loss')}, grad norm {m.get('grad_norm')}")
    iv = report["interventions"]
    lines.append(f"guardian: {iv['skip']} skips, {iv['rollback']} rollbacks, {iv['abort']} aborts")
    for e in report["guardian_events"]:
        if e.get("event") in ("skip", "rollback", "abort"):
            lines.append(f"  step {e.get('step')}: {e['event']} - {e.get('reason', '')}")
    return "\n".join(lines)


def inspect_checkpoint(run_url: str, step: int | None = None, s3: S3Config | None = None,
                       verify: bool = False) -> dict[str, Any]:
    require_run(run_url, s3)
    store, _ = open_run(run_url, s3)
    listing = store.list()
    # Every checkpoint a resume would pass over is named here with what is wrong with it (damaged by a
    # load, torn, missing ranks), so the person knows which step is used and why.
    unusable = [{"step": c.step, "problems": c.problems} for c in listing if not c.complete]
    if step is None:
        step = store.latest_complete()
        if step is None:
            return {"run": run_url, "complete": False, "problem": "no complete checkpoint in this run",
                    "unusable": unusable}
    info = next((c for c in listing if c.step == step), None)
    if info is None:
        return {"run": run_url, "step": step, "complete": False, "problem": f"no checkpoint at step {step}",
                "unusable": unusable}
    out: dict[str, Any] = {"run": run_url, "step": step, "complete": info.complete, "pinned": info.pinned,
                           "world_size": info.world_size, "problems": info.problems, "unusable": unusable}
    if info.complete:
        records = store.records(step)
        out["files"] = {name: meta["size"] for r in records.values() for name, meta in r.files.items()}
        out["bytes"] = sum(out["files"].values())
        state = store.read_json(step, "trainer_state.json")
        out["trainer_state"] = {k: state.get(k) for k in ("step", "cursor", "metrics", "world_size", "strategy")}
        if verify:
            v = store.verify(step, full=True)
            out["verified"] = v.ok
            out["problems"] = v.problems
            out["complete"] = v.ok
    return out

"""The shards a run trains on, recorded in the run's directory at its first start and compared at every later
one that resumes a checkpoint: a cursor's positions mean documents of those shards only, so a dataset prepared
again under a running job is refused, naming the first shard that differs, instead of training on other
documents unnoticed.

    check_dataset_unchanged(run_dir, manifest, cfg.data.path, allow=cfg.data.allow_manifest_change, resumes=...)
"""

from __future__ import annotations

import json
import logging
from typing import Any

from raytrainer.data.manifest import DataError, Manifest

log = logging.getLogger(__name__)

RECORD = "data/shards.json"
FIELDS = ("path", "source", "bucket", "num_docs", "num_tokens", "sha256")


def shard_rows(manifest: Manifest) -> list[list[Any]]:
    return [[getattr(s, f) for f in FIELDS] for s in manifest.shards]


def differences(recorded: list[list[Any]], now: list[list[Any]]) -> list[str]:
    """What changed, shard by shard in manifest order, as sentences."""
    out = []
    before = {row[0]: row for row in recorded}
    after = {row[0]: row for row in now}
    for i, (old, new) in enumerate(zip(recorded, now, strict=False)):
        if old != new:
            if old[0] != new[0]:
                out.append(f"shard {i} is {new[0]}, was {old[0]}")
            else:
                changed = [f"{f} {o!r} -> {n!r}" for f, o, n in zip(FIELDS, old, new, strict=True) if o != n]
                out.append(f"shard {new[0]}: {', '.join(changed)}")
    out += [f"shard {path} is gone" for path in before if path not in after and len(now) < len(recorded)]
    out += [f"shard {path} is new" for path in after if path not in before and len(now) > len(recorded)]
    return out


def check_dataset_unchanged(run: Any, manifest: Manifest, dataset: str, allow: bool = False,
                            resumes: bool = True) -> None:
    """Record the run's shards at its first start; later, refuse a dataset whose shards differ (unless allowed).
    `run` is the run directory's Storage. A start that `resumes` no checkpoint has no data position to protect:
    it records its shards afresh, so a start refused or crashed before its first checkpoint binds the run to
    nothing."""
    now = shard_rows(manifest)
    if not resumes or not run.exists(RECORD):
        run.write_bytes(RECORD, json.dumps({"dataset": dataset, "shards": now}).encode())
        return
    recorded = json.loads(run.read_bytes(RECORD))
    changes = differences(recorded["shards"], now)
    if not changes:
        return
    more = f" (and {len(changes) - 1} more differences)" if len(changes) > 1 else ""
    what = (f"{dataset}: the dataset changed since this run started from {recorded['dataset']}: {changes[0]}{more}; "
            f"the run's data position belongs to the shards recorded in {run.uri(RECORD)}")
    if not allow:
        raise DataError(f"{what}. Train on the dataset as it was, start a new run from this one's weights "
                        "(--set model.init_from=run:<this run>), or --set data.allow_manifest_change=true to go on "
                        "with positions that now name other documents")
    log.warning("%s; going on (data.allow_manifest_change=true): the data order from here is not the one this run "
                "would have had", what)
    run.write_bytes(RECORD, json.dumps({"dataset": dataset, "shards": now}).encode())

"""Ray Train's list of checkpoints, as pointers to the store's steps.

Ray Train is told of every committed checkpoint through ray.train.report, as a small pointer directory
(one file: step and URL) under <storage>/<run>/registered/. The checkpoint itself stays where the store
wrote and committed it: retention and guardian rollbacks delete store directories, and a Ray run snapshot
that listed those would refuse the next resubmission. Pointers are never deleted, so Ray's list stays
valid; a pointer whose step was pruned or rolled back resolves to nothing (read_pointer + the store).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from raytrainer.checkpoint.store import CheckpointStore

log = logging.getLogger("raytrainer.checkpoint")

POINTER_FILE = "raytrainer_checkpoint.json"


def registered_dir_name(step: int) -> str:
    return f"registered/step_{step:08d}"


def write_pointer(directory: str | Path, store: CheckpointStore, step: int) -> None:
    (Path(directory) / POINTER_FILE).write_text(json.dumps(
        {"step": step, "url": store.step_url(step), "run": store.run_name}))


def read_pointer(checkpoint: Any) -> dict | None:
    """{"step", "url", "run"} of a checkpoint Ray Train returns (get_checkpoint, Result.checkpoint, ...)."""
    if checkpoint is None:
        return None
    path = f"{checkpoint.path.rstrip('/')}/{POINTER_FILE}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        log.warning("Ray Train checkpoint %s has no readable %s (%s); ignoring it", checkpoint.path, POINTER_FILE, e)
        return None

"""Where metrics records go. Each sink takes batches of records (dicts with a `kind`) and may raise: the
recorder decides what a failure means (a warning, never a stopped run).

Records are JSON objects:
    {"kind": "step", "step": 12, "loss": ..., ...}         one per training step taken
    {"kind": "eval", "step": 25, "val_loss": ..., ...}     one per evaluation
    {"kind": "rollback", "step": 85, "to": 25, "abandoned": [25, 85], ...}
    {"kind": "resume", "step": 50, ...}                    an attempt began at a checkpoint
    {"kind": "checkpoint", "step": 50}                     every rank committed it
Every record also has `attempt` (which start of the job wrote it) and `time` (Unix seconds).
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import time
from typing import Any, Protocol

from raytrainer.storage import Storage

METRICS_DIR = "metrics"
TENSORBOARD_DIR = "tensorboard"

# Scalars plotted per kind; anything else in a record stays in the JSON lines only.
STEP_SCALARS = ("loss", "perplexity", "grad_norm", "lr", "tokens_per_s", "mfu", "step_time_s", "data_wait_s",
                "memory_gb", "tokens_seen", "step_time_spread_s")
EVAL_SCALARS = ("val_loss", "val_perplexity")


class Sink(Protocol):
    name: str

    def write(self, records: list[dict]) -> None: ...
    def close(self) -> None: ...


def _json_line(record: dict) -> str:
    # NaN and inf are not JSON: a diverged step is written as null so every reader can parse the file.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, sort_keys=True, default=str)


class JsonlSink:
    """`<run>/metrics/<attempt>.jsonl`, appended, on a local disk; on object storage, which cannot append,
    one object per flush: `<run>/metrics/<attempt>.<seq>.jsonl`. Names sort in the order they were written."""

    name = "metrics jsonl"

    def __init__(self, run: Storage, attempt: str):
        self.storage = run.child(METRICS_DIR)
        self.attempt = attempt
        self._seq = 0

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        data = ("\n".join(_json_line(r) for r in records) + "\n").encode()
        if self.storage.is_local:
            path = self.storage.path(f"{self.attempt}.jsonl")
            self.storage.fs.create_dir(posixpath.dirname(path), recursive=True)
            with open(path, "ab") as f:  # one write per flush: a crash leaves whole lines
                f.write(data)
            return
        self.storage.write_bytes(f"{self.attempt}.{self._seq:06d}.jsonl", data)
        self._seq += 1

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard event files in `<run>/tensorboard/`: one per attempt, appended, on a local disk; one per
    flush on object storage (it cannot append). Named so that they sort by time: `tensorboard --logdir <run>`
    shows the curves."""

    name = "tensorboard"

    def __init__(self, run: Storage, attempt: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2, self._summary_pb2, self._record_writer = event_pb2, summary_pb2, RecordWriter
        self.storage = run.child(TENSORBOARD_DIR)
        self.attempt = attempt
        self._seq = 0
        self._name: str | None = None

    def write(self, records: list[dict]) -> None:
        events = [e for r in records for e in self._events(r)]
        if not events:
            return
        buffer = io.BytesIO()
        writer = self._record_writer(buffer)
        if self._seq == 0 or not self.storage.is_local:
            events.insert(0, self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        for event in events:
            writer.write(event.SerializeToString())
        if self.storage.is_local:  # one file per attempt, appended (whole records per flush)
            if self._name is None:
                self._name = f"events.out.tfevents.{int(time.time()):010d}.{self.attempt}"
            path = self.storage.path(self._name)
            self.storage.fs.create_dir(posixpath.dirname(path), recursive=True)
            with open(path, "ab") as f:
                f.write(buffer.getvalue())
        else:
            # "events.out.tfevents." is what TensorBoard looks for; the time first keeps attempts in order.
            name = f"events.out.tfevents.{int(time.time()):010d}.{self.attempt}.{self._seq:06d}"
            self.storage.write_bytes(name, buffer.getvalue())
        self._seq += 1

    def _events(self, record: dict) -> list[Any]:
        values = [self._summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in _scalars(record).items()]
        if not values:
            return []
        return [self._event_pb2.Event(wall_time=record.get("time", time.time()), step=int(record["step"]),
                                      summary=self._summary_pb2.Summary(value=values))]

    def close(self) -> None:
        pass


class MlflowSink:
    """MLflow, when metrics.mlflow is set: scalars per step into one MLflow run per raytrainer run."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, params: dict):
        import mlflow

        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self._run = mlflow.start_run(run_name=run_name)
        mlflow.log_params(_flat(params))

    def write(self, records: list[dict]) -> None:
        for r in records:
            values = _scalars(r)
            if values:
                self._mlflow.log_metrics(values, step=int(r["step"]))

    def close(self) -> None:
        self._mlflow.end_run()


class WandbSink:
    """Weights & Biases, when metrics.wandb is set."""

    name = "wandb"

    def __init__(self, project: str, entity: str | None, mode: str, run_name: str, params: dict):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=project, entity=entity, mode=mode, name=run_name, id=run_name,
                               resume="allow", config=params)

    def write(self, records: list[dict]) -> None:
        for r in records:
            values = _scalars(r)
            if values:
                self._run.log(values, step=int(r["step"]))

    def close(self) -> None:
        self._run.finish()


def _scalars(record: dict) -> dict[str, float]:
    keys = {"step": STEP_SCALARS, "eval": EVAL_SCALARS}.get(record.get("kind"), ())
    prefix = "train/" if record.get("kind") == "step" else "val/"
    return {prefix + k.removeprefix("val_"): float(record[k]) for k in keys
            if isinstance(record.get(k), int | float) and math.isfinite(record[k])}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

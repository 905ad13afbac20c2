"""The recorder a run's rank 0 writes through, from the config."""

from __future__ import annotations

import importlib.util
import logging
import secrets
from datetime import UTC, datetime

from raytrainer.config import Config, ConfigError, to_dict
from raytrainer.metrics.recorder import MetricsRecorder
from raytrainer.metrics.sinks import JsonlSink, MlflowSink, Sink, TensorBoardSink, WandbSink
from raytrainer.storage import Storage, open_storage

log = logging.getLogger("raytrainer.metrics")


def new_attempt_id() -> str:
    """Sorts by start time, to the microsecond: a restart can begin within the second its attempt's
    predecessor did, and a run's history replays attempts in the order their names sort. The suffix keeps
    attempts of two hosts apart."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(2)}"


def run_storage(cfg: Config) -> Storage:
    """<checkpoint.storage>/<run.name>, with short timeouts: an outage fails a write, it does not hang it."""
    return open_storage(cfg.checkpoint.storage, cfg.checkpoint.s3, connect_timeout=10,
                        request_timeout=30).child(cfg.run.name)


def check_metrics_config(cfg: Config) -> None:
    """Before any work: an optional sink that is configured must be installed."""
    for key, module in (("metrics.mlflow", "mlflow"), ("metrics.wandb", "wandb")):
        if getattr(cfg.metrics, key.split(".")[1]) is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key} is set, but the '{module}' package is not installed on this machine: "
                              f"`pip install {module}` on every node, or remove {key}")


def build_sinks(cfg: Config, run: Storage, attempt: str) -> list[Sink]:
    m = cfg.metrics
    sinks: list[Sink] = [JsonlSink(run, attempt)]
    if m.tensorboard:
        sinks.append(TensorBoardSink(run, attempt))
    params = to_dict(cfg)  # redacted: a tracking server never sees a key
    optional = []
    if m.mlflow is not None:
        optional.append(("metrics.mlflow", lambda: MlflowSink(m.mlflow.tracking_uri, m.mlflow.experiment,
                                                              cfg.run.name, params)))
    if m.wandb is not None:
        optional.append(("metrics.wandb", lambda: WandbSink(m.wandb.project, m.wandb.entity, m.wandb.mode,
                                                            cfg.run.name, params)))
    for key, make in optional:
        try:
            sinks.append(make())
        except Exception as e:  # a tracking server that is down must not stop the run
            log.warning("metrics: %s could not be started (%s: %s); training goes on without it; the JSON "
                        "lines in %s hold every metric", key, type(e).__name__, e, run.uri("metrics"))
    return sinks


def open_recorder(cfg: Config, run: Storage | None = None, attempt: str | None = None) -> MetricsRecorder:
    run = run or run_storage(cfg)
    attempt = attempt or new_attempt_id()
    return MetricsRecorder(build_sinks(cfg, run, attempt), attempt, flush_every_s=cfg.metrics.flush_every_s)

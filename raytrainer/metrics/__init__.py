"""A run's metrics on record: every step, evaluation and recovery event, written by rank 0 in the background
to `<run>/metrics/` (JSON lines, the record of truth) and TensorBoard event files beside them, plus MLflow and
Weights & Biases when configured. `history.read_history` puts a run's records back together across attempts."""

from raytrainer.metrics.history import RunHistory, read_history
from raytrainer.metrics.recorder import MetricsRecorder, NullRecorder

__all__ = ["MetricsRecorder", "NullRecorder", "RunHistory", "read_history"]

"""MLflow and Weights & Biases are used when configured and installed, never required: a configured one that
is not installed is a config error before any work; one that cannot start is a warning. (Neither package is a
dependency; a stand-in module records what our sink calls.)"""

from __future__ import annotations

import logging
import sys
import types

import pytest

from raytrainer.config import ConfigError, load_config
from raytrainer.metrics.setup import build_sinks, check_metrics_config
from raytrainer.storage import open_storage


class Calls(list):
    def __getattr__(self, name):
        return lambda *a, **k: self.append((name, a, k)) or types.SimpleNamespace(
            log=lambda values, step: self.append(("run.log", (values,), {"step": step})),
            finish=lambda: self.append(("run.finish", (), {})))


@pytest.fixture
def fake_mlflow(monkeypatch):
    calls = Calls()
    monkeypatch.setitem(sys.modules, "mlflow", calls)
    return calls


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = Calls()
    monkeypatch.setitem(sys.modules, "wandb", calls)
    return calls


STEP = {"kind": "step", "step": 7, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 100.0, "action": "continue"}


def test_mlflow_gets_the_scalars_and_a_redacted_config(tmp_path, fake_mlflow):
    cfg = load_config("tiny", ["metrics.mlflow={tracking_uri: http://mlflow:5000, experiment: pretrain}",
                               "checkpoint.s3.secret_access_key=hunter2"])
    sinks = build_sinks(cfg, open_storage(str(tmp_path)), "a")
    mlflow = next(s for s in sinks if s.name == "mlflow")
    mlflow.write([STEP, {"kind": "eval", "step": 25, "val_loss": 2.0}, {"kind": "checkpoint", "step": 25}])
    mlflow.close()
    names = [c[0] for c in fake_mlflow]
    assert names == ["set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "log_metrics",
                     "end_run"]
    assert fake_mlflow[0][1] == ("http://mlflow:5000",)
    params = fake_mlflow[3][1][0]
    assert params["checkpoint.s3.secret_access_key"].startswith("***") and "hunter2" not in str(params)
    assert fake_mlflow[4][1][0] == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 100.0}
    assert fake_mlflow[4][2] == {"step": 7}
    assert fake_mlflow[5][1][0] == {"val/loss": 2.0}


def test_wandb_gets_the_scalars(tmp_path, fake_wandb):
    cfg = load_config("tiny", ["metrics.wandb={project: llm, mode: offline}"])
    wandb = next(s for s in build_sinks(cfg, open_storage(str(tmp_path)), "a") if s.name == "wandb")
    wandb.write([STEP])
    wandb.close()
    init = fake_wandb[0]
    assert init[0] == "init" and init[2]["project"] == "llm" and init[2]["mode"] == "offline"
    assert ("run.log", ({"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 100.0},), {"step": 7}) in fake_wandb


def test_a_configured_sink_that_is_not_installed_is_named_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow fails, as when it is not installed
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    cfg = load_config("tiny", ["metrics.mlflow={experiment: x}"])
    with pytest.raises(ConfigError, match=r"metrics.mlflow is set, but the 'mlflow' package is not installed.*"
                                          r"pip install mlflow"):
        check_metrics_config(cfg)
    check_metrics_config(load_config("tiny"))  # nothing configured: nothing needed


def test_a_tracking_server_that_cannot_start_is_a_warning(tmp_path, monkeypatch, caplog):
    broken = types.SimpleNamespace(set_tracking_uri=lambda uri: None,
                                   set_experiment=lambda name: (_ for _ in ()).throw(ConnectionError("refused")))
    monkeypatch.setitem(sys.modules, "mlflow", broken)
    caplog.set_level(logging.WARNING, logger="raytrainer.metrics")
    cfg = load_config("tiny", ["metrics.mlflow={experiment: x}"])
    sinks = build_sinks(cfg, open_storage(str(tmp_path)), "a")
    assert [s.name for s in sinks] == ["metrics jsonl", "tensorboard"]
    assert "metrics.mlflow could not be started (ConnectionError: refused)" in caplog.text

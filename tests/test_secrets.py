"""Credentials never leave memory: the config marks them secret, and nothing persisted or printed holds them."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any, get_args

import pyarrow.fs as pafs
import pytest
import torch
from pydantic import BaseModel, SecretStr

from raytrainer.config import (
    Config,
    ConfigError,
    S3Config,
    load_config,
    secret_paths,
    secret_values,
    to_dict,
    with_secrets,
)
from raytrainer.storage import StorageError, open_filesystem, resolve_s3_settings

# ------------------------------------------------------------------ which fields are credentials

_SECRET_WORDS = {"secret", "password", "passwd", "passphrase", "token", "apikey", "auth"}
# "key" alone names many things (a sort key, a cache key); with one of these before it, it is a credential.
_KEY_QUALIFIERS = {"access", "api", "private", "secret", "session", "signing", "sas", "account"}


def looks_like_credential(name: str) -> bool:
    """By the words of a field name: `secret_access_key`, `access_key_id`, `hf_token`, `password`, but not
    `keep_last` (no such word), `key_prefix` (an unqualified key), `tokenizer` or `max_doc_tokens` (other
    words), nor `credentials_file` (a path to where the secret lives, not the secret)."""
    words = name.lower().split("_")
    if _SECRET_WORDS & set(words):
        return True
    return any(w == "key" and i > 0 and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words))


@pytest.mark.parametrize("name", ["secret_access_key", "access_key_id", "api_key", "password", "hf_token",
                                  "session_token", "private_key", "auth"])
def test_credential_names_are_recognised(name):
    assert looks_like_credential(name)


@pytest.mark.parametrize("name", ["keep_last", "keep_every", "key_prefix", "tokenizer", "max_doc_tokens",
                                  "global_batch_tokens", "credentials_file", "credentials_profile", "sort_key"])
def test_other_names_are_not_credentials(name):
    assert not looks_like_credential(name)


def _models(annotation: Any) -> list[type[BaseModel]]:
    found = [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []
    for arg in get_args(annotation):
        found += _models(arg)
    return found


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_is_secret(a) for a in get_args(annotation))


def all_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every field of the config, by dotted path, through nested sections, lists and optionals."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        out[prefix + name] = field.annotation
        for sub in _models(field.annotation):
            out |= all_fields(sub, f"{prefix}{name}.")
    return out


def test_every_credential_field_is_marked_secret():
    fields = all_fields(Config)
    credentials = {path for path in fields if looks_like_credential(path.rsplit(".", 1)[-1])}
    assert "checkpoint.s3.secret_access_key" in credentials and "data.s3.access_key_id" in credentials
    unmarked = sorted(path for path in credentials if not _is_secret(fields[path]))
    assert unmarked == [], f"credential fields not typed Secret(...) in raytrainer/config.py: {unmarked}"
    assert secret_paths() == {path for path in fields if _is_secret(fields[path])}


# ------------------------------------------------------------------ to_dict, overrides, errors

KEY_ID, SECRET = "AKIAEXAMPLEKEYID0123", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEYS = [f"checkpoint.s3.access_key_id={KEY_ID}", f"checkpoint.s3.secret_access_key={SECRET}",
        f"data.s3.access_key_id={KEY_ID}", f"data.s3.secret_access_key={SECRET}"]


def test_to_dict_redacts_every_secret_and_reveal_round_trips():
    cfg = load_config("tiny", KEYS)
    text = json.dumps(to_dict(cfg))
    assert SECRET not in text and KEY_ID not in text and SECRET not in repr(cfg) and SECRET not in str(cfg)
    s3 = to_dict(cfg)["checkpoint"]["s3"]
    assert s3["secret_access_key"].startswith("***") and "AWS_SECRET_ACCESS_KEY" in s3["secret_access_key"]
    assert "s3.credentials_file" in s3["access_key_id"]
    revealed = to_dict(cfg, reveal_secrets=True)
    assert revealed["checkpoint"]["s3"]["secret_access_key"] == SECRET
    back = Config.model_validate(json.loads(json.dumps(revealed)))
    assert back == cfg and back.checkpoint.s3.secret_access_key.get_secret_value() == SECRET
    # The hand-over to Ray Train workers: the redacted dict plus the values, bound apart from it.
    values = secret_values(cfg)
    assert set(values) == secret_paths() and values["data.s3.access_key_id"] == KEY_ID
    assert Config.model_validate(with_secrets(to_dict(cfg), values)) == cfg
    assert secret_values(load_config("tiny")) == {}


def test_ray_train_records_no_secret(tmp_path):
    """Ray Train keeps train_loop_config in its run state (dashboard, export events): only the redacted
    config goes there, and the worker function gets the keys bound to it."""
    from ray.train._internal.utils import count_required_parameters

    from raytrainer.launch import build_torch_trainer

    cfg = load_config("tiny", KEYS)
    trainer = build_torch_trainer(cfg, str(tmp_path), None)
    assert SECRET not in json.dumps(trainer.train_loop_config) and SECRET not in repr(trainer.train_loop_per_worker)
    assert count_required_parameters(trainer.train_loop_per_worker) == 1
    secrets = trainer.train_loop_per_worker.keywords["secrets"]
    handed = Config.model_validate(with_secrets(trainer.train_loop_config["config"],
                                                json.loads(secrets.get_secret_value())))
    assert handed == cfg


def test_a_key_override_is_taken_as_typed_text():
    cfg = load_config("tiny", ["checkpoint.s3.access_key_id=0123", "checkpoint.s3.secret_access_key=1e5"])
    assert resolve_s3_settings(cfg.checkpoint.s3).secret_access_key == "1e5"
    assert resolve_s3_settings(cfg.checkpoint.s3).access_key_id == "0123"


def test_config_errors_do_not_echo_a_secret(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [*KEYS, "optim.lr=fast"])
    assert SECRET not in str(err.value) and "checkpoint.s3.secret_access_key=***" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"checkpoint.s3.secret_access_key={SECRET}", "checkpoint.s3.secret_access_key.x=1"])
    assert SECRET not in str(err.value)
    numeric = "987654321987"  # YAML reads it as a number: the wrong type, and the error must not show it
    path = tmp_path / "run.yaml"
    path.write_text(f"checkpoint:\n  s3:\n    secret_access_key: {numeric}\n")
    with pytest.raises(ConfigError, match="checkpoint.s3.secret_access_key: .*value not shown") as err:
        load_config(path)
    assert numeric not in str(err.value)


def test_settings_repr_hides_the_keys():
    settings = resolve_s3_settings(S3Config(endpoint_url="http://127.0.0.1:1", access_key_id=KEY_ID,
                                            secret_access_key=SECRET))
    assert SECRET not in repr(settings) and KEY_ID not in repr(settings) and KEY_ID not in settings.describe()


# ------------------------------------------------------------------ keys from a file or the environment


@pytest.fixture
def no_aws_env(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


def test_keys_from_a_credentials_file(tmp_path, no_aws_env):
    path = tmp_path / "credentials"
    path.write_text(f"[default]\naws_access_key_id = a\naws_secret_access_key = b\n"
                    f"[lab]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    cfg = load_config("tiny", [f"checkpoint.s3.credentials_file={path}", "checkpoint.s3.credentials_profile=lab"])
    settings = resolve_s3_settings(cfg.checkpoint.s3)
    assert (settings.access_key_id, settings.secret_access_key) == (KEY_ID, SECRET)
    with pytest.raises(StorageError, match=r"no \[nope\] section .*credentials_profile"):
        resolve_s3_settings(S3Config(credentials_file=str(path), credentials_profile="nope"))
    with pytest.raises(StorageError, match="s3.credentials_file .*missing.*cannot be read"):
        resolve_s3_settings(S3Config(credentials_file=str(tmp_path / "missing")))


def test_redacted_keys_are_taken_from_the_environment_or_named(monkeypatch, no_aws_env):
    written = to_dict(load_config("tiny", KEYS))  # what a checkpoint holds
    restored = Config.model_validate(written).checkpoint.s3
    with pytest.raises(StorageError, match=r"s3.access_key_id is missing \(the config holds a redacted value\)"
                                           r".*AWS_ACCESS_KEY_ID"):
        resolve_s3_settings(restored)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    with pytest.raises(StorageError, match="s3.secret_access_key is missing.*AWS_SECRET_ACCESS_KEY"):
        resolve_s3_settings(restored)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    settings = resolve_s3_settings(restored)
    assert (settings.access_key_id, settings.secret_access_key) == (KEY_ID, SECRET)


# ------------------------------------------------------------------ a real run: nothing holds the secret


def _scan_storage(url: str, s3: S3Config, needles: list[str]) -> tuple[int, list[str]]:
    fs, root = open_filesystem(url, s3)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    hits = []
    for info in infos:
        with fs.open_input_stream(info.path) as f:
            data = f.read()
        hits += [f"{info.path}: {n}" for n in needles if n.encode() in data]
    return len(infos), hits


@pytest.mark.slow
def test_a_run_with_keys_on_the_command_line_writes_them_nowhere(s3_server, s3_url, tmp_path, monkeypatch,
                                                                 caplog, capsys, no_aws_env):
    from raytrainer.fault.events import EventLog, RunStore
    from raytrainer.fault.guardian import Guardian
    from raytrainer.report import format_report, inspect_checkpoint, run_report
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import build_trainer
    from runs import make_dataset, micro_config

    caplog.set_level(logging.DEBUG, logger="raytrainer")
    torch.set_num_threads(1)
    key_id, secret = s3_server.access_key, s3_server.secret_key
    dataset = make_dataset(tmp_path)
    place = [f"checkpoint.s3.endpoint_url={s3_server.endpoint_url}", "checkpoint.s3.region=us-east-1"]

    def fit(cfg: Config) -> list[dict]:
        events = EventLog(RunStore.for_run(cfg))
        guardian = Guardian(cfg.guardian, cfg.run.name, on_event=events.append)
        return build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=guardian).fit()["history"]

    cfg = micro_config(dataset, s3_url, name="secrets", steps=10, extra=[
        *place, f"checkpoint.s3.access_key_id={key_id}", f"checkpoint.s3.secret_access_key={secret}"])
    fit(cfg)
    run_url = f"{s3_url}/secrets"
    report = run_report(run_url, cfg.checkpoint.s3)
    inspected = inspect_checkpoint(run_url, s3=cfg.checkpoint.s3, verify=True)
    assert report["latest_complete"] == 10 and inspected["complete"]
    printed = json.dumps(report, default=str) + format_report(report) + json.dumps(inspected, default=str)
    count, hits = _scan_storage(s3_url, s3_server.s3_config(), [secret, key_id])
    assert count > 5 and hits == []  # checkpoints, trainer state, records, guardian events and state
    state = json.loads(_read(s3_url, s3_server.s3_config(), "secrets/checkpoints/step_00000010/trainer_state.json"))
    assert state["config"]["checkpoint"]["s3"]["secret_access_key"].startswith("***")
    out = capsys.readouterr()
    for text in (printed, caplog.text, out.out, out.err):
        assert secret not in text and key_id not in text

    # Resume with the keys only in the environment: the checkpoint's redacted copy is never used.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    resumed_cfg = micro_config(dataset, s3_url, name="secrets", steps=15, extra=place)
    assert resumed_cfg.checkpoint.s3.secret_access_key is None
    history = fit(resumed_cfg)
    steps = [h["step"] for h in history if "loss" in h and h.get("applied")]
    assert min(steps) == 10 and max(steps) == 14
    assert _scan_storage(s3_url, s3_server.s3_config(), [secret, key_id])[1] == []


def _read(url: str, s3: S3Config, rel: str) -> str:
    fs, root = open_filesystem(url, s3)
    with fs.open_input_stream(f"{root}/{rel}") as f:
        return f.read().decode()


def _unrevealed_reads(source: str) -> list[int]:
    """Lines that read `.access_key_id` / `.secret_access_key` other than through `.get_secret_value()` or
    `reveal(...)`."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in ("access_key_id", "secret_access_key")
                and isinstance(node.ctx, ast.Load)):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr == "get_secret_value":
            continue
        if isinstance(parent, ast.Call) and getattr(parent.func, "id", None) == "reveal":
            continue
        lines.append(node.lineno)
    return lines


def test_no_module_reads_a_key_without_revealing_it():
    # A SecretStr in an f-string or a client's keyword argument is '**********': every use must reveal.
    root = Path(__file__).resolve().parent.parent
    # S3Settings holds the revealed pair; reading it there is the point.
    allowed = {"raytrainer/storage.py"}
    offenders = []
    for sub in ("raytrainer", "jobs", "bench"):
        for path in (root / sub).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if rel not in allowed:
                offenders += [f"{rel}:{n}" for n in _unrevealed_reads(path.read_text())]
    assert offenders == []
    assert _unrevealed_reads("f'{s3.secret_access_key}'\nreveal(s3.access_key_id)\n") == [1]

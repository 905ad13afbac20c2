"""The validation split: held out by `prepare` by a hash of each document, disjoint from training, the same
batches at any world size, and a validation loss that falls as the model learns."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from raytrainer.config import load_config
from raytrainer.data.manifest import DataError, Manifest
from raytrainer.data.pipeline import read_shard
from raytrainer.data.prepare import prepare_dataset
from raytrainer.data.sources import InputSpec
from raytrainer.data.validation import ValidationBatches
from raytrainer.fault.guardian import Guardian
from raytrainer.metrics import read_history
from raytrainer.storage import open_storage
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import MICRO, make_dataset, micro_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("val-data"))


def _docs(dataset, records) -> set[str]:
    storage = open_storage(str(dataset))
    out = set()
    for r in records:
        shard = read_shard(storage, r.path)
        for i in range(len(shard.offsets) - 1):
            out.add(hashlib.sha1(shard.values[shard.offsets[i]:shard.offsets[i + 1]].tobytes()).hexdigest())
    return out


def test_prepare_holds_out_documents_disjoint_from_training(dataset):
    manifest = Manifest.load(str(dataset))
    assert manifest.validation, "the sample corpus has a validation split"
    assert all(r.path.split("/")[1] == "validation" and r.bucket == "validation" for r in manifest.validation)
    assert manifest.validation_tokens >= 8192  # at least a few thousand tokens, even on a small corpus
    train, val = _docs(dataset, manifest.shards), _docs(dataset, manifest.validation)
    assert val and not (train & val)
    assert manifest.prepare["val_fraction"] == 0.005


def _write_docs(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def test_the_split_depends_on_the_documents_not_their_order(tmp_path):
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{int(x)}" for x in rng.integers(0, 500, int(rng.integers(20, 200)))) for _ in range(2000)]
    _write_docs(tmp_path / "a.jsonl", texts)
    _write_docs(tmp_path / "b.jsonl", list(reversed(texts)))
    held = []
    for name in ("a", "b"):
        out = tmp_path / f"out-{name}"
        prepare_dataset([InputSpec(str(tmp_path / f"{name}.jsonl"), "web")], str(out), "byte", use_ray=False,
                        val_fraction=0.05, shard_tokens=1 << 14)
        m = Manifest.load(str(out))
        held.append(_docs(out, m.validation))
        assert not held[-1] & _docs(out, m.shards)
        total = sum(1 for _ in open(tmp_path / f"{name}.jsonl"))
        assert 0.03 * total < len(held[-1]) < 0.07 * total  # about val_fraction of the documents
    assert held[0] == held[1]


def test_a_bad_val_fraction_is_refused(tmp_path):
    _write_docs(tmp_path / "a.jsonl", ["hello world"] * 10)
    with pytest.raises(DataError, match="--val-fraction 1.5"):
        prepare_dataset([InputSpec(str(tmp_path / "a.jsonl"), "web")], str(tmp_path / "o"), "byte",
                        use_ray=False, val_fraction=1.5)


def _rows(batches: ValidationBatches):
    """Every real row of every batch, in order."""
    out = []
    for batch in batches.batches:
        rows = [mb["input_ids"][i] for mb in batch for i in range(mb["input_ids"].shape[0])
                if (mb["labels"][i] != -100).any()]
        out.append(rows)
    return out


def test_validation_batches_are_the_same_at_one_and_two_workers(dataset):
    cfg = load_config("tiny", [*MICRO, f"data.path={dataset}", "eval.every_steps=10", "eval.batches=3"])
    one = _rows(ValidationBatches(cfg, 0, 1))
    two = [a + b for a, b in zip(_rows(ValidationBatches(cfg, 0, 2)), _rows(ValidationBatches(cfg, 1, 2)),
                                 strict=True)]
    assert len(one) == 3 and all(len(b) == cfg.train.global_batch_tokens // cfg.train.seq_len for b in one)
    for a, b in zip(one, two, strict=True):
        assert len(a) == len(b)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    r0, r1 = ValidationBatches(cfg, 0, 2), ValidationBatches(cfg, 1, 2)
    assert [len(b) for b in r0.batches] == [len(b) for b in r1.batches]  # same number of forward passes


def test_a_dataset_without_a_validation_split_is_a_clear_error(tmp_path):
    _write_docs(tmp_path / "a.jsonl", ["some text to train on"] * 50)
    prepare_dataset([InputSpec(str(tmp_path / "a.jsonl"), "web")], str(tmp_path / "noval"), "byte",
                    use_ray=False, val_fraction=0)
    cfg = load_config("tiny", [*MICRO, f"data.path={tmp_path / 'noval'}", "eval.every_steps=10"])
    with pytest.raises(DataError, match=r"noval/manifest.json has no validation split.*data.val_path"):
        ValidationBatches(cfg)
    # data.val_path names a separate prepared dataset: every one of its documents is validation data.
    prepare_dataset([InputSpec(str(tmp_path / "a.jsonl"), "web")], str(tmp_path / "heldout"), "byte",
                    use_ray=False, val_fraction=0)
    cfg = load_config("tiny", [*MICRO, f"data.path={tmp_path / 'noval'}", "eval.every_steps=10",
                               f"data.val_path={tmp_path / 'heldout'}"])
    assert ValidationBatches(cfg).tokens > 0


def test_validation_loss_falls_and_is_on_record(dataset, tmp_path, one_thread):
    cfg = micro_config(dataset, str(tmp_path), name="val", steps=40, extra=["eval.every_steps=10", "eval.batches=4"])
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    params_before = [p.detach().clone() for p in trainer.engine.model.parameters()]
    first = trainer.evaluate(0)
    assert all(torch.equal(a, b) for a, b in zip(params_before, trainer.engine.model.parameters(), strict=True))
    trainer.fit()
    evals = {e["step"]: e["val_loss"] for e in trainer.evals}
    assert sorted(evals) == [0, 10, 20, 30, 40]
    assert evals[40] < first["val_loss"] - 1.0, evals
    assert evals[40] < evals[10], evals
    history = read_history(open_storage(str(tmp_path)).child("val"))
    assert [e["step"] for e in history.evals] == [0, 10, 20, 30, 40]
    assert history.evals[-1]["val_loss"] == pytest.approx(evals[40])
    # Every real token is a target but each document's last (its EOS predicts nothing).
    assert 0.9 * trainer.validation.tokens < history.evals[-1]["tokens"] <= trainer.validation.tokens

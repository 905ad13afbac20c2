"""Fault injection: each kind does what it says, at its step and rank; `once` survives rollbacks, restarts."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch

from raytrainer.config import Config
from raytrainer.fault.events import MemoryStore, RunStore
from raytrainer.fault.injection import INJECTED_CRASH_EXIT_CODE, FaultInjector, poison_tokens, shuffle_labels


def config(*faults: dict) -> Config:
    return Config.model_validate({"faults": list(faults), "model": {"vocab_size": 320}})


def micro_batches(n: int = 2, rows: int = 2, seq: int = 16) -> list[dict]:
    out = []
    for i in range(n):
        ids = torch.arange(rows * seq).reshape(rows, seq) % 200 + i
        labels = ids.roll(-1, dims=1).clone()
        labels[:, -4:] = -100  # tail padding
        ids[:, -4:] = 257
        out.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq).expand(rows, seq),
                    "doc_ids": torch.zeros(rows, seq, dtype=torch.long)})
    return out


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None
    metrics: dict = field(default_factory=dict)


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, labels=None):
        loss = self.weight * 2.0
        return ModelOutput(input_ids.float(), loss, {"ce": loss.detach(), "label_tokens": torch.tensor(10)})


def test_poisoned_batch_changes_labelled_positions_only():
    clean = micro_batches()
    poisoned = poison_tokens(clean, 320, torch.Generator().manual_seed(0))
    for before, after in zip(clean, poisoned, strict=True):
        labelled = before["labels"] != -100
        assert (after["labels"][~labelled] == -100).all()
        assert torch.equal(after["input_ids"][~labelled], before["input_ids"][~labelled])
        assert (after["labels"][labelled] != before["labels"][labelled]).float().mean() > 0.9
        assert after["input_ids"].dtype == torch.int64 and int(after["input_ids"].max()) < 320
        assert torch.equal(after["position_ids"], before["position_ids"])


def test_shuffled_labels_keep_each_rows_targets_and_ignored_positions():
    clean = micro_batches()
    shuffled = shuffle_labels(clean, torch.Generator().manual_seed(0))
    for before, after in zip(clean, shuffled, strict=True):
        assert torch.equal(before["labels"] == -100, after["labels"] == -100)
        for row in range(before["labels"].shape[0]):
            assert sorted(before["labels"][row].tolist()) == sorted(after["labels"][row].tolist())
        assert not torch.equal(before["labels"], after["labels"])
        assert torch.equal(before["input_ids"], after["input_ids"])


def test_batch_faults_fire_at_their_step_and_rank_only():
    cfg = config({"step": 5, "kind": "loss_spike", "rank": 1},
                 {"step": 6, "kind": "shuffle_labels", "rank": 0})
    rank0 = FaultInjector(cfg, rank=0, store=MemoryStore())
    rank1 = FaultInjector(cfg, rank=1, store=MemoryStore())
    clean = micro_batches()
    assert rank0.before_forward(5, clean) is clean
    assert rank0.before_forward(6, clean) is not clean
    assert rank1.before_forward(4, clean) is clean
    assert not torch.equal(rank1.before_forward(5, clean)[0]["labels"], clean[0]["labels"])


def test_grad_explode_scales_the_loss_of_that_step_only():
    model = TinyModel()
    inj = FaultInjector(config({"step": 3, "kind": "grad_explode", "scale": 1000.0}), 0, store=MemoryStore(),
                        model=model)
    batches = inj.before_forward(3, micro_batches(n=2))
    losses = [model(mb["input_ids"]).loss for mb in batches]
    assert [float(x.detach()) for x in losses] == [2000.0, 2000.0]
    sum(losses).backward()
    assert float(model.weight.grad) == pytest.approx(4000.0)  # the gradient is scaled too
    assert float(model(batches[0]["input_ids"]).loss.detach()) == 2.0  # a third forward (eval): untouched
    inj.before_forward(4, micro_batches())
    assert float(model(batches[0]["input_ids"]).loss.detach()) == 2.0


def test_nan_loss_makes_the_loss_and_the_reported_ce_nan():
    model = TinyModel()
    inj = FaultInjector(config({"step": 2, "kind": "nan_loss"}), 0, store=MemoryStore())
    inj.attach(model)
    (mb,) = inj.before_forward(2, micro_batches(n=1))
    out = model(mb["input_ids"])
    assert math.isnan(float(out.loss.detach())) and math.isnan(float(out.metrics["ce"]))
    assert int(out.metrics["label_tokens"]) == 10
    out.loss.backward()
    assert math.isnan(float(model.weight.grad))


def test_loss_fault_without_the_model_says_what_is_missing():
    inj = FaultInjector(config({"step": 2, "kind": "nan_loss"}), 0, store=MemoryStore())
    with pytest.raises(RuntimeError, match="needs the model"):
        inj.before_forward(2, micro_batches())


def test_once_fires_a_single_time_across_rollbacks_and_restarts(tmp_path):
    cfg = config({"step": 5, "kind": "shuffle_labels"})
    store = RunStore.local(tmp_path)
    clean = micro_batches()
    inj = FaultInjector(cfg, 0, store=store)
    assert inj.before_forward(5, clean) is not clean
    assert inj.before_forward(5, clean) is clean  # a rollback replays step 5
    restarted = FaultInjector(cfg, 0, store=RunStore.local(tmp_path))  # a new worker process
    assert restarted.before_forward(5, clean) is clean
    assert list(tmp_path.glob("faults/fired-step00000005-rank0-shuffle_labels.json"))


def test_not_once_fires_every_time_the_step_is_reached():
    inj = FaultInjector(config({"step": 5, "kind": "shuffle_labels", "once": False}), 0, store=MemoryStore())
    clean = micro_batches()
    assert inj.before_forward(5, clean) is not clean and inj.before_forward(5, clean) is not clean


def test_s3_outage_calls_the_hook_and_requires_one():
    calls = []
    cfg = config({"step": 4, "kind": "s3_outage"})
    inj = FaultInjector(cfg, 0, hooks={"s3_outage": calls.append}, store=MemoryStore())
    inj.before_forward(4, micro_batches())
    inj.before_forward(4, micro_batches())
    assert calls == [4]
    with pytest.raises(ValueError, match=r"faults\[0\] \(kind=s3_outage, step=4\) needs a hook"):
        FaultInjector(cfg, 0, store=MemoryStore())


def test_crash_and_hang_call_their_actions():
    exits, hangs = [], []
    cfg = config({"step": 1, "kind": "crash"}, {"step": 2, "kind": "hang"})
    inj = FaultInjector(cfg, 0, store=MemoryStore(), exit_fn=exits.append, hang_fn=lambda: hangs.append(1))
    inj.before_forward(1, micro_batches())
    inj.before_forward(2, micro_batches())
    assert exits == [INJECTED_CRASH_EXIT_CODE] and hangs == [1]


def test_a_real_crash_exits_the_process_and_does_not_fire_again_after_a_restart(tmp_path):
    code = textwrap.dedent(f"""
        from raytrainer.config import Config
        from raytrainer.fault.events import RunStore
        from raytrainer.fault.injection import FaultInjector
        cfg = Config.model_validate({{"faults": [{{"step": 3, "kind": "crash"}}]}})
        inj = FaultInjector(cfg, 0, store=RunStore.local({str(tmp_path)!r}))
        for step in range(6):
            inj.before_forward(step, [])
        print("finished")
    """)
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert first.returncode == INJECTED_CRASH_EXIT_CODE and "crashing rank 0 at step 3" in first.stderr
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and second.stdout.strip() == "finished", second.stderr

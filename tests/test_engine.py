"""The step engine in one process: accumulation equals one big batch (padding micro-batches included),
clipping, activation checkpointing, non-finite steps never applied, skips, lr factors, learning."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from raytrainer.config import Config, load_config
from raytrainer.model import Transformer
from raytrainer.train.engine import StepEngine
from raytrainer.train.parallelize import parallelize
from raytrainer.train.schedule import lr_at
from raytrainer.train.strategy import SingleProcess

TINY = [
    "model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.multiple_of=32", "model.max_seq_len=32", "model.qk_norm=true", "precision.dtype=fp32",
    "train.seq_len=32", "train.global_batch_tokens=128", "train.micro_batch_size=2", "schedule.warmup_steps=0",
    "optim.lr=1e-2", "optim.grad_clip=null",
]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


def make_batch(cfg: Config, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows of two documents each: labels shifted, no prediction across the document boundary."""
    seq_len = cfg.train.seq_len
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, seq_len + 1), generator=g)
    split = torch.randint(2, seq_len - 2, (rows,), generator=g)
    position = torch.arange(seq_len).expand(rows, seq_len)
    doc_ids = (position >= split[:, None]).long()
    position_ids = torch.where(doc_ids == 0, position, position - split[:, None])
    labels = tokens[:, 1:].clone()
    labels[torch.arange(rows), split - 1] = -100
    labels[0, -3:] = -100  # a little tail padding too: label counts differ between rows
    return {"input_ids": tokens[:, :-1], "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


def split_rows(batch: dict, sizes: list[int]) -> list[dict]:
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start:start + size] for k, v in batch.items()})
        start += size
    return out


def padding_micro_batch(batch: dict) -> dict:
    pad = {k: v[:1].clone() for k, v in batch.items()}
    pad["labels"].fill_(-100)
    return pad


def build(cfg: Config, seed: int = 0, model: torch.nn.Module | None = None) -> tuple[SingleProcess, StepEngine]:
    torch.manual_seed(seed)
    model = parallelize(model if model is not None else Transformer(cfg.model), cfg)
    strategy = SingleProcess(cfg, model)
    return strategy, StepEngine(strategy.model, cfg, strategy)


def grads(strategy) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in strategy.module.named_parameters()}


def params(strategy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in strategy.module.named_parameters()}


def reference_loss_and_grads(cfg: Config, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """The plain definition: mean CE over every label token of the batch, one forward, one backward."""
    strategy, _ = build(cfg)
    loss = strategy.module(**batch).loss
    loss.backward()
    return float(loss.detach()), grads(strategy)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("sizes", [[4], [2, 2], [1, 3], [2, 2, "pad"], ["pad", 1, 1, 2]])
def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch(sizes):
    cfg = tiny_config()
    batch = make_batch(cfg, rows=4)
    ref_loss, ref_grads = reference_loss_and_grads(cfg, batch)

    strategy, engine = build(cfg)
    rows = split_rows(batch, [s for s in sizes if s != "pad"])
    micro = [padding_micro_batch(batch) if s == "pad" else rows.pop(0) for s in sizes]
    stats = engine.forward_backward(micro, step=0)

    assert stats.loss == pytest.approx(ref_loss, rel=1e-6)
    assert stats.label_tokens == int((batch["labels"] != -100).sum())
    assert stats.finite and not stats.overflow
    for name, g in grads(strategy).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values()))
    assert stats.grad_norm == pytest.approx(float(total), rel=1e-5)


# ---------------------------------------------------------------------------------------------- clipping


def test_clipping_reports_the_pre_clip_norm_and_bounds_the_post_clip_norm():
    batch = make_batch(tiny_config(), rows=4)
    _, ref_grads = reference_loss_and_grads(tiny_config(), batch)
    unclipped = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())))
    max_norm = unclipped / 10

    strategy, engine = build(tiny_config(f"optim.grad_clip={max_norm}"))
    stats = engine.forward_backward([batch], step=0)
    assert stats.grad_norm == pytest.approx(unclipped, rel=1e-5)
    clipped = grads(strategy)
    post = float(torch.sqrt(sum((g.double() ** 2).sum() for g in clipped.values())))
    assert post == pytest.approx(max_norm, rel=1e-4)
    for name, g in clipped.items():  # the direction is kept
        torch.testing.assert_close(g * 10, ref_grads[name], rtol=1e-4, atol=1e-8)


def test_a_norm_below_the_threshold_is_left_alone():
    batch = make_batch(tiny_config(), rows=4)
    _, ref_grads = reference_loss_and_grads(tiny_config(), batch)
    strategy, engine = build(tiny_config("optim.grad_clip=1e6"))
    engine.forward_backward([batch], step=0)
    for name, g in grads(strategy).items():
        assert torch.equal(g, ref_grads[name]), name


# ---------------------------------------------------------------------------------------------- model setup


def test_activation_checkpointing_gives_the_same_gradients_through_the_engine():
    batch = make_batch(tiny_config(), rows=4)
    plain, plain_engine = build(tiny_config())
    plain_stats = plain_engine.forward_backward(split_rows(batch, [2, 2]), step=0)
    for mode in ("full", "selective"):
        ckpt, engine = build(tiny_config(f"train.activation_checkpointing.mode={mode}"))
        assert getattr(ckpt.module.layers[0] if mode == "full" else ckpt.module.layers[0].self_attn,
                       "_activation_checkpointed", False)
        stats = engine.forward_backward(split_rows(batch, [2, 2]), step=0)
        assert stats.loss == plain_stats.loss
        assert stats.grad_norm == pytest.approx(plain_stats.grad_norm, rel=1e-6)
        reference = grads(plain)
        for name, g in grads(ckpt).items():
            torch.testing.assert_close(g, reference[name], rtol=1e-6, atol=1e-9, msg=name)


def test_prepare_model_compiles_block_by_block_and_keeps_parameter_names():
    cfg = tiny_config("train.compile=true")
    model = Transformer(cfg.model)
    names = [n for n, _ in model.named_parameters()]
    prepared = parallelize(model, cfg)
    assert prepared is model
    assert [n for n, _ in prepared.named_parameters()] == names
    assert all(block._compiled_call_impl is not None for block in prepared.layers)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    batch = make_batch(tiny_config(), rows=2)
    eager, eager_engine = build(tiny_config())
    compiled, engine = build(tiny_config("train.compile=true"))
    assert engine.forward_backward([batch], 0).loss == pytest.approx(eager_engine.forward_backward([batch], 0).loss,
                                                                      rel=1e-5)
    reference = grads(eager)
    for name, g in grads(compiled).items():
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_blocks_compile_a_bounded_number_of_graphs_over_curriculum_lengths_and_padding(monkeypatch):
    """A sequence-length warmup goes through many lengths, and a replica short of rows runs a one-row padding
    micro-batch: the blocks recompile once to dynamic shapes, not once per length (dynamo's cache holds 8 graphs
    per frame; past that it silently runs eagerly)."""
    from torch._dynamo.utils import counters

    # Dynamo decides what recompiles before a backend sees a graph: aot_eager keeps inductor's code generation
    # (a minute on a CPU) out of the count.
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_config("train.compile=true", "model.max_seq_len=128")
    model = parallelize(Transformer(cfg.model), cfg)
    graphs = {}
    for seq_len in (32, 64, 96, 128, 48):
        batch = make_batch(tiny_config(f"train.seq_len={seq_len}", "model.max_seq_len=128",
                                       f"train.global_batch_tokens={2 * seq_len}"), rows=2)
        for micro_batch in (batch, padding_micro_batch(batch)):
            inputs = {k: v for k, v in micro_batch.items() if k != "labels"}
            model(**inputs, labels=micro_batch["labels"]).loss.backward()
        graphs[seq_len] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    # the first length and its padding batch static, then each dynamic in the length: no graph for later lengths
    assert graphs[64] <= 4
    assert graphs[96] == graphs[128] == graphs[48] == graphs[64]


# ---------------------------------------------------------------------------------------------- apply


def test_apply_sets_the_scheduled_lr_times_factor_and_scale_then_steps_and_zeroes_grads():
    cfg = tiny_config("schedule.warmup_steps=10", "model.mup_base_d_model=32")  # hidden lr_scale 0.5
    strategy, engine = build(cfg)
    before = params(strategy)
    engine.forward_backward([make_batch(cfg, rows=2)], step=3)
    assert engine.apply(lr_factor=0.5) is True
    assert engine.current_lr == pytest.approx(lr_at(3, cfg) * 0.5)
    lrs = {g["name"]: g["lr"] for g in strategy.optimizer.param_groups}
    assert lrs["hidden"] == pytest.approx(engine.current_lr * 0.5)
    assert lrs["norms"] == pytest.approx(engine.current_lr)
    assert all(p.grad is None for p in strategy.module.parameters())
    after = params(strategy)
    assert all(not torch.equal(before[n], after[n]) for n in before if "norm" not in n)
    assert engine.updates_applied == 1


def test_skip_leaves_weights_and_optimizer_state_alone():
    cfg = tiny_config()
    strategy, engine = build(cfg)
    before = params(strategy)
    stats = engine.forward_backward([make_batch(cfg, rows=2)], step=0)
    assert engine.apply(skip=True) is False
    assert stats.applied is False
    assert all(torch.equal(before[n], p) for n, p in params(strategy).items())
    assert strategy.optimizer.state_dict()["state"] == {}
    assert all(p.grad is None for p in strategy.module.parameters())
    assert engine.updates_skipped == 1


def test_a_non_finite_step_is_reported_with_its_step_and_never_applied(caplog):
    cfg = tiny_config()
    strategy, engine = build(cfg)
    with torch.no_grad():
        strategy.module.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = params(strategy)
    with caplog.at_level(logging.WARNING, logger="raytrainer.train"):
        stats = engine.train_step([make_batch(cfg, rows=2)], step=17)
    assert not stats.finite and stats.applied is False
    assert all(torch.equal(before[n].nan_to_num(), p.nan_to_num()) for n, p in params(strategy).items())
    assert strategy.optimizer.state_dict()["state"] == {}
    messages = [r.getMessage() for r in caplog.records]
    assert any("step 17" in m and "NON-FINITE" in m for m in messages)
    assert any("step 17 skipped" in m for m in messages)
    # apply(skip=False) on a non-finite step still refuses, and says so
    engine.forward_backward([make_batch(cfg, rows=2)], step=18)
    with caplog.at_level(logging.ERROR, logger="raytrainer.train"):
        assert engine.apply(skip=False) is False
    assert any("step 18" in r.getMessage() and "NOT applying" in r.getMessage() for r in caplog.records)


def test_steps_must_alternate_forward_backward_and_apply():
    cfg = tiny_config()
    _, engine = build(cfg)
    with pytest.raises(RuntimeError, match="apply\\(\\) without forward_backward"):
        engine.apply()
    engine.forward_backward([make_batch(cfg, rows=2)], step=0)
    with pytest.raises(RuntimeError, match="still waits for apply"):
        engine.forward_backward([make_batch(cfg, rows=2)], step=1)
    engine.zero_grad()  # dropping the pending step (as a rollback does) allows the next one
    engine.forward_backward([make_batch(cfg, rows=2)], step=1)


def test_stats_and_engine_state():
    cfg = tiny_config()
    _, engine = build(cfg)
    stats = engine.train_step(split_rows(make_batch(cfg, rows=4), [2, 2]), step=0)
    assert stats.tokens == cfg.rows_per_global_batch(0) * cfg.train.seq_len
    assert stats.seq_len == cfg.train.seq_len
    assert stats.time_s >= stats.metrics["forward_backward_s"] + stats.metrics["apply_s"] > 0
    state = json.loads(json.dumps(engine.state_dict()))  # goes into trainer_state.json
    assert state["updates_applied"] == 1
    _, fresh = build(cfg)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == engine.state_dict()


# ---------------------------------------------------------------------------------------------- learning


def test_a_tiny_model_overfits_a_fixed_batch_through_the_engine():
    cfg = tiny_config("optim.grad_clip=1.0", "schedule.name=constant", "optim.weight_decay=0.0")
    _, engine = build(cfg)
    micro = split_rows(make_batch(cfg, rows=4), [2, 2])
    losses = [engine.train_step(micro, step).loss for step in range(60)]
    assert losses[0] > 3.5  # about ln(64) at initialisation
    assert losses[-1] < 0.5
    assert engine.updates_applied == 60


# ---------------------------------------------------------------------------------------------- checkpoints


def exp_avgs(strategy) -> dict[str, torch.Tensor]:
    return {n: strategy.optimizer.state[p]["exp_avg"] for n, p in strategy.module.named_parameters()}


def test_a_staged_checkpoint_is_the_state_at_staging_even_if_written_after_more_steps(tmp_path):
    cfg = tiny_config("train.ema_decay=0.9")
    strategy, engine = build(cfg)
    engine.train_step([make_batch(cfg, rows=2)], step=0)
    at_staging = {n: p.detach().clone() for n, p in params(strategy).items()}
    moments = {n: m.clone() for n, m in exp_avgs(strategy).items()}
    ema = {n: t.clone() for n, t in engine.ema.shadow.items()}
    write = engine.stage_checkpoint(tmp_path / "ck")
    engine.train_step([make_batch(cfg, rows=2)], step=1)  # changes weights, moments and EMA in place
    write()
    restored, restored_engine = build(cfg, seed=5)
    restored_engine.load_checkpoint(tmp_path / "ck", saved_world_size=1)
    assert not torch.equal(params(strategy)["embed_tokens.weight"], at_staging["embed_tokens.weight"])
    assert all(torch.equal(p, at_staging[n]) for n, p in params(restored).items())
    assert all(torch.equal(exp_avgs(restored)[n], m) for n, m in moments.items())
    assert all(torch.equal(t, ema[n]) for n, t in restored_engine.ema.shadow.items())


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_checkpoint_roundtrip_in_one_process_and_loading_never_unpickles_code(tmp_path, monkeypatch):
    import io
    import pickle

    from raytrainer.checkpoint.dcp_io import SafeLoadPlanner

    cfg = tiny_config("train.ema_decay=0.9")
    strategy, engine = build(cfg)
    engine.train_step([make_batch(cfg, rows=2)], step=0)
    engine.save_checkpoint(tmp_path / "ck")
    restored, restored_engine = build(cfg, seed=5)
    restored_engine.load_checkpoint(tmp_path / "ck", saved_world_size=1)
    assert all(torch.equal(p, params(strategy)[n]) for n, p in params(restored).items())
    assert all(torch.equal(t, engine.ema.shadow[n]) for n, t in restored_engine.ema.shadow.items())

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load it"):
        restored_engine.load_checkpoint(tmp_path / "ck", saved_world_size=1)
    planner = SafeLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    payload = io.BytesIO()
    torch.save(_Payload(), payload)
    payload.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(None, payload)  # non-tensor items load with weights_only=True
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint here"):
        restored_engine.load_checkpoint(tmp_path / "nowhere", saved_world_size=1)

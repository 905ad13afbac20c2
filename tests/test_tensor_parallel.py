"""Tensor + sequence parallel (parallel.tp) on gloo ranks: the same losses, gradients and checkpoints as one
process, alone (tp=2) and composed with FSDP2 on a 2-D mesh (dp2 x tp2); checkpoints move between meshes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from strategy_harness import (
    assert_follows_the_reference,
    assert_same_gradients,
    build,
    curve_run,
    load_as_a_resume_would,
    load_result,
    merge_rank_dirs,
    probe_batch,
    probe_logits,
    save_result,
    single_process_curve,
    spawn,
    tiny_config,
    train_steps,
)

STEPS = range(4)  # steps 2 and 3 are in the second curriculum phase (more, shorter rows)


def tp_config(tp: int, workers: int):
    return tiny_config("fsdp", f"parallel.tp={tp}", f"parallel.min_workers={workers}",
                       f"parallel.max_workers={workers}")


def run_curve(rank: int, world_size: int, out_dir, tp: int) -> None:
    save_result(out_dir, "run", rank, curve_run(tp_config(tp, world_size), rank, world_size, STEPS)[0])


@pytest.fixture(scope="module")
def reference() -> dict:
    # tensor parallel computes the loss from its slices of the logits: the single process from whole logits
    return single_process_curve(tiny_config("ddp", "model.loss.chunk_tokens=0"), STEPS)[0]


@pytest.mark.slow
@pytest.mark.parametrize("world_size,tp", [(2, 2), (4, 2)], ids=["tp2", "dp2xtp2"])
def test_tensor_parallel_follows_the_single_process_curve(world_size, tp, reference, tmp_path):
    spawn(run_curve, world_size, tmp_path, tp)
    runs = [load_result(tmp_path, "run", rank) for rank in range(world_size)]
    assert_follows_the_reference(runs, reference)
    assert_same_gradients(runs[0]["grads"], reference["grads"])


def run_between_meshes(rank: int, world_size: int, out_dir) -> None:
    """tp2 trains and saves; dp2 loads it, then trains and saves; tp2 loads that. Both continue from each."""
    results = {}
    for name, tp, source in (("tp2", 2, None), ("dp2", 1, "tp2"), ("tp2-again", 2, "dp2")):
        cfg = tp_config(tp, world_size)
        strategy, engine = build(cfg, rank, world_size)
        if source is None:
            train_steps(engine, cfg, [0, 1, 2], rank, world_size)
        else:
            load_as_a_resume_would(engine, out_dir, source, name, rank, world_size)
        engine.save_checkpoint(out_dir / name / f"rank{rank}")
        dist.barrier()
        results[name] = {"logits": probe_logits(strategy, cfg),
                         "continued": torch.tensor(train_steps(engine, cfg, [3, 4], rank, world_size))}
    save_result(out_dir, "meshes", rank, results)


@pytest.mark.slow
def test_checkpoints_move_between_tensor_and_data_parallel_meshes(tmp_path):
    spawn(run_between_meshes, 2, tmp_path)
    results = load_result(tmp_path, "meshes")
    tp2, dp2, again = results["tp2"], results["dp2"], results["tp2-again"]
    for other in (dp2, again):  # the same model on another mesh: outputs and the optimizer's way on
        torch.testing.assert_close(other["logits"], tp2["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other["continued"], tp2["continued"], rtol=1e-5, atol=1e-6)

    # one process (export, generate) reads the tensor-parallel checkpoint whole
    from raytrainer.model import Transformer
    from raytrainer.train.strategies import load_full_state_dict

    cfg = tp_config(2, 2)
    merged = merge_rank_dirs(sorted((tmp_path / "tp2").iterdir()), tmp_path / "merged-export")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.load_state_dict(load_full_state_dict(cfg, model, merged))
    with torch.no_grad():
        logits = model(probe_batch(cfg)).logits
    torch.testing.assert_close(logits, tp2["logits"], rtol=1e-5, atol=1e-5)


def run_vocab_parallel_loss(rank: int, world_size: int, out_dir) -> None:
    from raytrainer.model.loss import token_loss_sums
    from raytrainer.train.vocab_parallel_loss import vocab_parallel_loss_sums

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 12, generator=g) * 3
    labels = torch.randint(0, 12, (2, 5), generator=g)
    labels[0, :2] = -100  # ignored positions
    results = {}
    for smoothing, z_weight in ((0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)):
        whole = logits.clone().requires_grad_()
        ref = token_loss_sums(whole, labels, smoothing, z_weight)
        (ref.objective * 0.7).backward()
        mine = logits[..., rank * 6:(rank + 1) * 6].clone().requires_grad_()
        out = vocab_parallel_loss_sums(mine, labels, smoothing, z_weight, vocab_start=rank * 6, vocab_size=12,
                                       group=dist.group.WORLD)
        (out.objective * 0.7).backward()
        results[(smoothing, z_weight)] = {
            "got": torch.stack([out.objective.detach(), out.ce, out.z, out.count.double()]),
            "want": torch.stack([ref.objective.detach(), ref.ce, ref.z, ref.count.double()]),
            "grad": mine.grad, "want_grad": whole.grad[..., rank * 6:(rank + 1) * 6],
            "token_ce": out.token_ce}
    save_result(out_dir, "loss", rank, results)


@pytest.mark.slow
def test_the_vocab_parallel_loss_equals_the_whole_loss_and_its_gradients(tmp_path):
    """Logits split by vocabulary over two ranks: smoothing, z-loss and ignored positions as on whole logits."""
    spawn(run_vocab_parallel_loss, 2, tmp_path)
    for rank in range(2):
        for terms, r in load_result(tmp_path, "loss", rank).items():
            torch.testing.assert_close(r["got"].double(), r["want"].double(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, t=terms: f"{t}: {m}")
            torch.testing.assert_close(r["grad"], r["want_grad"], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, t=terms: f"{t} gradients: {m}")
            assert r["token_ce"].shape == (2, 5) and (r["token_ce"][0, :2] == 0).all()

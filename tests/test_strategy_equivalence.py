"""Same seed, same data: ddp, fsdp and deepspeed (ZeRO 1/2/3, with and without offload) on 2 gloo ranks
train the tiny model along the same fp32 loss and grad-norm curve as one process does alone."""

from __future__ import annotations

import pytest
import torch

from strategy_harness import build, load_result, save_result, spawn, tiny_config, train_steps

STEPS = range(4)  # steps 2 and 3 are in the second curriculum phase (more, shorter rows)

VARIANTS = {
    "ddp": ("ddp",),
    "fsdp": ("fsdp",),
    "fsdp-offload-no-reshard": ("fsdp", "parallel.fsdp_cpu_offload=true",
                                "parallel.fsdp_reshard_after_forward=false"),
    "zero1": ("deepspeed", "parallel.zero_stage=1"),
    "zero2": ("deepspeed", "parallel.zero_stage=2"),
    "zero3": ("deepspeed", "parallel.zero_stage=3"),
    "zero2-offload": ("deepspeed", "parallel.zero_stage=2", "parallel.offload_optimizer=true"),
    "zero3-offload": ("deepspeed", "parallel.zero_stage=3", "parallel.offload_optimizer=true",
                      "parallel.offload_params=true"),
}
# one pair of processes runs a group in turn (process start-up is most of the cost of a variant)
GROUPS = {
    "torch": ["ddp", "fsdp", "fsdp-offload-no-reshard"],
    "zero": ["zero1", "zero2", "zero3"],
    "zero-offload": ["zero2-offload", "zero3-offload"],
}


def run_curves(rank: int, world_size: int, out_dir, names: list[str]) -> None:
    for name in names:
        cfg = tiny_config(*VARIANTS[name])
        _, engine = build(cfg, rank, world_size)
        save_result(out_dir, name, rank, torch.tensor(train_steps(engine, cfg, STEPS, rank, world_size)))


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """One process, no process group (SingleProcess): the whole global batch in its own micro-steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config("ddp")
        _, engine = build(cfg, 0, 1)
        return torch.tensor(train_steps(engine, cfg, STEPS, 0, 1))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("group", list(GROUPS))
def test_two_ranks_follow_the_single_process_curve(group, reference, tmp_path):
    assert (reference[:, 1] > 0.5).all()  # above the clip threshold: every step exercised clipping
    spawn(run_curves, 2, tmp_path, GROUPS[group])
    for name in GROUPS[group]:
        curves = [load_result(tmp_path, name, rank) for rank in range(2)]
        assert torch.equal(curves[0], curves[1]), f"{name}: ranks disagree on the global loss / grad norm"
        torch.testing.assert_close(curves[0][:, 0], reference[:, 0], rtol=2e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{name} loss curve: {m}")
        torch.testing.assert_close(curves[0][:, 1], reference[:, 1], rtol=2e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{name} grad-norm curve: {m}")

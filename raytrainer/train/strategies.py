"""Choose the strategy named in the config, and read any strategy's checkpoint back in one process."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from raytrainer.config import Config
from raytrainer.train.strategy import DDPStrategy, SingleProcess, Strategy, distributed

log = logging.getLogger("raytrainer.train")


def build_strategy(cfg: Config, model: nn.Module, rank: int, world_size: int,
                   device: torch.device) -> Strategy:
    from raytrainer.train.mesh import ParallelDims
    from raytrainer.train.parallelize import parallelize

    p = cfg.parallel
    dims = ParallelDims(world_size, tp=p.tp, ep=p.ep, pp=p.pp, cp=p.cp)
    mesh = expert_mesh = None
    if dims.replica_size > 1:
        ensure_process_group(rank, world_size, device)
        mesh = dims.build_mesh(device.type)
    if dims.ep > 1:
        ensure_process_group(rank, world_size, device)
        expert_mesh = dims.build_expert_mesh(device.type)
    model = parallelize(model, cfg, mesh, expert_mesh)
    if dims.pp > 1:
        from raytrainer.train.pipeline import PipelineStrategy

        return PipelineStrategy(cfg, model, rank, world_size, device, mesh)
    if dims.cp > 1:  # data parallel over every rank: the cp ranks' gradients are parts of one row's
        strategy = DDPStrategy(cfg, model, rank, world_size, device)
        strategy.mesh = mesh
        return strategy
    name = cfg.parallel.strategy
    if name == "fsdp":
        from raytrainer.train.fsdp import FSDPStrategy

        ensure_process_group(rank, world_size, device)
        return FSDPStrategy(cfg, model, rank, world_size, device, mesh=mesh)
    if name == "deepspeed":
        from raytrainer.train.deepspeed_strategy import DeepSpeedStrategy

        ensure_process_group(rank, world_size, device)
        return DeepSpeedStrategy(cfg, model, rank, world_size, device)
    if distributed():
        strategy = DDPStrategy(cfg, model, rank, world_size, device)
        strategy.expert_mesh = expert_mesh
        return strategy
    return SingleProcess(cfg, model, rank, world_size, device)


def ensure_process_group(rank: int, world_size: int, device: torch.device) -> None:
    """FSDP and DeepSpeed shard over a process group even when there is one rank: give a lone process
    its own (an in-memory store, no port); several ranks must have initialised theirs already."""
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"the process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"but the strategy was asked for rank {rank} of {world_size}")
        return
    if world_size != 1:
        raise RuntimeError(f"rank {rank} of {world_size}: torch.distributed is not initialised; the launcher "
                           "(Ray Train, torchrun) must create the process group before the strategy")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    log.info("created a single-rank %s process group", backend)


def load_full_state_dict(cfg: Config, model: nn.Module, directory: str | Path, use_ema: bool = False) -> dict:
    """The whole model's weights (or their EMA) from a checkpoint's model/ directory, in one process."""
    from raytrainer.train.strategy import load_dcp_model_state

    if cfg.parallel.strategy == "deepspeed":
        from raytrainer.checkpoint.deepspeed_io import load_full_state_dict as load_deepspeed

        state = load_deepspeed(directory, use_ema=use_ema)
        return _with_parameters(model, state) if use_ema else state
    if use_ema:
        from raytrainer.checkpoint import dcp_io

        state = {"ema": {n: p.detach().float().clone() for n, p in model.named_parameters()}}
        dcp_io.load(state, directory)  # never unpickles anything but tensors and DCP metadata
        return _with_parameters(model, state["ema"])
    return load_dcp_model_state(model, directory)


@torch.no_grad()
def _with_parameters(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model's state dict with its parameters replaced by `params` (keyed like named_parameters(), which
    lists a tied lm_head once, as embed_tokens): the values go into the model, so tied keys agree."""
    for name, p in model.named_parameters():
        p.copy_(params[name])
    return {k: v.clone() for k, v in model.state_dict().items()}

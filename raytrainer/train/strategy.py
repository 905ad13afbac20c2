"""One interface over how a model is distributed: wrap, accumulate without sync, clip, step, save, load.

SingleProcess and DDP live here; FSDP2 (fsdp.py) and DeepSpeed ZeRO (deepspeed_strategy.py) implement
the same interface. Model + optimizer (+ EMA) state goes through torch.distributed.checkpoint (DCP), which
reshards on load, so a checkpoint written by N ranks loads on M.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from raytrainer.config import Config


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Strategy:
    name = "single"

    def __init__(self, cfg: Config, module: nn.Module, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        from raytrainer.train.optim import build_optimizer

        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self.module = module.to(self.device)  # the plain Transformer: names, EMA, checkpoints
        self.model = self.wrap(self.module)  # what forward is called on
        self.optimizer = build_optimizer(self.module, cfg)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    # ---- one step
    def no_sync(self):
        """Context for every micro-step but the last: gradients accumulate locally."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """The global gradient norm before clipping; clips to max_norm when given."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"),
                                              foreach=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def unscale_grads(self, scale: float) -> None:
        if scale != 1.0:
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.div_(scale)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, value: float) -> float:
        if not distributed():
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # ---- checkpoints
    def save(self, directory: Path, extra: dict | None = None) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, **(extra or {})}, checkpoint_id=str(directory))

    def load(self, directory: Path, saved_world_size: int, extra: dict | None = None) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, **(extra or {})}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


class SingleProcess(Strategy):
    name = "single"


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, module: nn.Module) -> nn.Module:
        if not distributed():
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def no_sync(self):
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()


def load_dcp_model_state(module: nn.Module, directory: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """A full (unsharded) model state dict from a DCP checkpoint, in one process (export, generate)."""
    state = {key: get_model_state_dict(module, options=StateDictOptions(full_state_dict=False))}
    dcp.load(state, checkpoint_id=str(directory))
    return state[key]

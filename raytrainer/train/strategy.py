"""One interface over how a model is distributed: wrap, accumulate without sync, clip, step, save, load.

    strategy.model          what forward is called on (a DDP wrapper, an FSDP module, a DeepSpeed engine)
    strategy.module         the plain Transformer underneath: parameter names, EMA, checkpoints
    strategy.optimizer
    with strategy.no_sync(): ...     every micro-step but the last: gradients accumulate locally
    strategy.backward(loss)
    strategy.clip_grad_norm(max_norm) -> pre-clip global norm
    strategy.optimizer_step(); strategy.zero_grad()
    strategy.all_reduce_sum(x)       a float summed over ranks
    strategy.all_gather_floats(xs)   every rank's list of floats, in rank order
    strategy.save(dir, extra) / strategy.load(dir, saved_world_size, extra)
    strategy.files_for_rank(dir, names, saved_world_size, extra)   the files load reads on this rank, once
                                     strategy.checkpoint_index_files are in dir
    write = strategy.stage_save(dir, extra); ...; write()   a save whose writing happens later (async checkpoints)

SingleProcess and DDP live here; FSDP2 (fsdp.py) and DeepSpeed ZeRO (deepspeed_strategy.py) implement
the same interface. Model + optimizer (+ EMA, as `extra`) state goes through DCP (dcp_io), which reshards on
load, so a checkpoint written by N ranks loads on M, and whose loading unpickles nothing but tensors,
containers and DCP's metadata classes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from raytrainer.checkpoint import dcp_io
from raytrainer.config import Config
from raytrainer.train.mesh import ParallelDims


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def default_backend(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


class Strategy:
    name = "single"
    owns_step = False  # True where the library scales, unscales and steps itself (DeepSpeed)
    # What a rank reads of a checkpoint before it can say which other files its load needs
    checkpoint_index_files: tuple[str, ...] = (dcp_io.METADATA_FILE,)
    _ckpt_group: dist.ProcessGroup | None = None  # made by the first staged save on more than one rank
    expert_mesh: DeviceMesh | None = None  # ("ep_replica", "ep") when experts are split over ranks

    def __init__(self, cfg: Config, module: nn.Module, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        from raytrainer.train.optim import build_optimizer

        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self._check_world()
        self.module = module.to(self.device)  # the plain Transformer: names, EMA, checkpoints
        self.model = self.wrap(self.module)  # what forward is called on
        self.optimizer = build_optimizer(self.module, cfg)

    def _check_world(self) -> None:
        actual = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.world_size != actual:
            raise RuntimeError(
                f"{type(self).__name__} was asked for rank {self.rank} of {self.world_size}, but "
                + ("torch.distributed is not initialised" if actual == 1 else f"the process group has {actual} ranks")
                + "; the launcher (Ray Train, torchrun) must create the process group first, with backend "
                + f"{default_backend(self.device)!r} for {self.device.type} workers"
            )

    @property
    def dims(self) -> ParallelDims:
        """How the world divides into data-parallel replicas, tensor- and expert-parallel groups."""
        p = self.cfg.parallel
        return ParallelDims(self.world_size, tp=p.tp, ep=p.ep, pp=p.pp, cp=p.cp)

    def finish_gradients(self) -> None:
        """After the last micro-step's backward: what the wrapper does not reduce (expert-parallel experts)."""
        if self.expert_mesh is not None:
            from raytrainer.train.expert_parallel import sync_expert_gradients

            replicas = self.expert_mesh["ep_replica"]
            sync_expert_gradients(self.module, replicas.get_group(), replicas.size(), self.dims.dp)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    # ---- one step
    def no_sync(self):
        """Context for every micro-step but the last: gradients accumulate locally."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """The global L2 norm of the gradients before clipping; scales them down to max_norm when it is
        given and exceeded. Non-finite gradients are left as they are (that step is never applied)."""
        grads = self.grads()
        if not grads:
            return 0.0
        sharded = [g for g in grads if isinstance(g, DTensor)]
        if sharded and len(sharded) < len(grads):  # expert parallel: sharded experts beside replicated weights
            plain = [g for g in grads if not isinstance(g, DTensor)]
            sharded_norm = float(torch.nn.utils.get_total_norm(sharded, foreach=True).full_tensor())
            plain_norm = float(torch.nn.utils.get_total_norm(plain, foreach=True))
            value = math.hypot(sharded_norm, plain_norm)
            if max_norm is not None and math.isfinite(value) and value > max_norm:
                for part in (sharded, plain):
                    torch._foreach_mul_(part, max_norm / (value + 1e-6))
            return value
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        # DTensor (FSDP2): a norm over the local shards, reduced over ranks by full_tensor()
        value = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        if max_norm is not None and math.isfinite(value) and value > max_norm:
            torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), max_norm, total, foreach=True)
        return value

    def unscale_grads(self, scale: float) -> None:
        """Divide the gradients by the fp16 loss scale (before clipping and before the norm is reported)."""
        if scale != 1.0:
            torch._foreach_mul_(self.grads(), 1.0 / scale)

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

    def all_gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values` (same length everywhere), in rank order."""
        if not distributed():
            return [[float(v) for v in values]]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # ---- checkpoints
    def _checkpoint_state(self, extra: dict | None, flat_optimizer: bool = True) -> dict:
        """What a checkpoint holds, as DCP sees it: model + optimizer (+ `extra`, e.g. {"ema": tensors}).

        The optimizer's state and hyperparameters are keyed by parameter name (`flat_optimizer`), not by param
        group: ranks holding different parameters (pipeline stages) each save their own, and a checkpoint loads
        whatever groups the loading ranks hold. Checkpoints written before that (keyed by group) still load."""
        options = StateDictOptions(flatten_optimizer_state_dict=flat_optimizer)
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=options)
        return {"model": model_sd, "optim": optim_sd, **(extra or {})}

    def save(self, directory: Path, extra: dict | None = None) -> None:
        """Model + optimizer (+ `extra`) as DCP; every rank calls it."""
        dcp_io.save(self._checkpoint_state(extra), directory)

    def stage_save(self, directory: Path, extra: dict | None = None) -> Callable[[], None] | None:
        """Copy model + optimizer (+ `extra`) into host memory now and return the function that writes that
        copy as DCP later, from a background thread, while training goes on; every rank calls both, in
        the same order. The write's collectives go through a gloo group of their own, so they never
        interleave with the training step's. None where the strategy cannot stage (then save())."""
        snapshot = dcp_io.host_copy(self._checkpoint_state(extra))
        group = self._checkpoint_group()
        return lambda: dcp_io.save(snapshot, directory, process_group=group)

    def _checkpoint_group(self) -> dist.ProcessGroup | None:
        if not distributed():
            return None
        if self._ckpt_group is None:
            self._ckpt_group = dist.new_group(backend="gloo")  # collective: every rank is here together
        return self._ckpt_group

    def files_for_rank(self, directory: Path, names: Collection[str], saved_world_size: int,
                       extra: dict | None = None) -> set[str]:
        """The files of the checkpoint in `directory` (named relative to it; `names` are all it has) that
        load() reads on this rank: the DCP metadata and the files holding a chunk of this rank's state. Only
        `checkpoint_index_files` need be in `directory` yet."""
        metadata = dcp_io.read_metadata(directory)
        state = self._checkpoint_state(extra, flat_optimizer=_flat_optimizer(metadata))
        return {dcp_io.METADATA_FILE} | dcp_io.files_for_state(metadata, state)

    def load(self, directory: Path, saved_world_size: int, extra: dict | None = None) -> None:
        """Load what save wrote, at any world size; `extra`'s tensors are filled in place. `directory`
        needs only the files that files_for_rank names."""
        flat = _flat_optimizer(dcp_io.read_metadata(directory))
        state = self._checkpoint_state(extra, flat_optimizer=flat)
        dcp_io.load(state, directory)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=StateDictOptions(flatten_optimizer_state_dict=flat))


def _flat_optimizer(metadata) -> bool:
    """Whether a checkpoint keys its optimizer by parameter name (since pipeline parallel) or by param group."""
    return not any(key.startswith("optim.param_groups.0.") for key in metadata.state_dict_metadata)


class SingleProcess(Strategy):
    name = "single"


class DDPStrategy(Strategy):
    """torch DDP: gradients all-reduced (averaged) during the last micro-step's backward; `no_sync` before it.

    With world_size 1 the module is used as it is (no wrapper, no communication)."""

    name = "ddp"

    def wrap(self, module: nn.Module) -> nn.Module:
        if not distributed():
            return module
        from raytrainer.train.parallelize import apply_ddp

        return apply_ddp(module, self.device)

    def no_sync(self):
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()


def load_dcp_model_state(module: nn.Module, directory: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """A full (unsharded) model state dict from a DCP checkpoint, in one process (export, generate)."""
    state = {key: get_model_state_dict(module, options=StateDictOptions(full_state_dict=False))}
    dcp_io.load(state, directory)
    return state[key]

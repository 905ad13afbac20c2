"""FSDP2: every transformer block, and then the root, sharded with `fully_shard`.

Parameters, gradients and optimizer state are DTensors sharded over the data-parallel ranks. Each block
is all-gathered just before its forward and resharded after it (`parallel.fsdp_reshard_after_forward`),
so peak memory holds one unsharded block at a time. Gradients are reduce-scattered only on the last
micro-step of a step (`no_sync` turns the reduction off before it), in fp32 whatever the compute dtype.

Initial weights: a model built normally (every rank from the same seed, as for DDP) is sharded as it is,
so FSDP starts from exactly the weights DDP starts from. A model built on the meta device, the path for
models that do not fit one host, is materialised shard by shard after sharding and initialised with
`init_weights()`.

Checkpoints are DCP (the base Strategy's save/load with `get_state_dict`/`set_state_dict`): each rank
writes its own shard file, and a checkpoint written by N ranks loads on M.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from raytrainer.config import Config
from raytrainer.train.strategy import Strategy

log = logging.getLogger("raytrainer.train")

# Compute (parameter all-gather) dtype per precision.dtype. Gradients are always reduced in fp32: the
# reduce-scatter sums many ranks' contributions, where bf16 loses the small ones. fp8 trains the linear
# layers in float8 (torchao) around bf16 parameters.
PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def mixed_precision_policy(dtype: str) -> MixedPrecisionPolicy:
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"precision.dtype={dtype!r} has no FSDP policy; "
                         f"choose one of {sorted(PARAM_DTYPES)}")
    param_dtype = PARAM_DTYPES[dtype]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)


def on_meta_device(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, cfg: Config, module: nn.Module, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, mesh: DeviceMesh | None = None):
        from raytrainer.train.optim import build_optimizer

        self.mesh = mesh  # ("dp", "tp"); None: data parallel alone
        # As Strategy.__init__, except that a meta-device model cannot be moved before it is sharded.
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        materialize = on_meta_device(module)
        self.module = module if materialize else module.to(self.device)
        self.model = self.wrap(self.module)
        if materialize:
            self._materialize()
        self.optimizer = build_optimizer(self.module, cfg)  # over the sharded (DTensor) parameters

    def wrap(self, module: nn.Module) -> nn.Module:
        from raytrainer.train.parallelize import apply_fsdp

        if self.mesh is not None:
            return apply_fsdp(module, self.cfg, self.mesh["dp"])
        return apply_fsdp(module, self.cfg, init_device_mesh(self.device.type, (self.world_size,),
                                                            mesh_dim_names=("dp",)))

    @torch.no_grad()
    def _materialize(self) -> None:
        # With CPU offload the sharded parameters live on the CPU; only the all-gathered ones visit the GPU.
        self.module.to_empty(device="cpu" if self.cfg.parallel.fsdp_cpu_offload else self.device)
        if self.device.type != "cuda":
            # DTensor's distributed RNG (one random stream cut into shards) exists only for accelerators;
            # elsewhere each rank fills its shard from its own generator, which must then differ by rank
            # or every shard would start identical.
            torch.manual_seed(self.cfg.train.seed + 7919 * (self.rank + 1))
        self.module.init_weights()
        log.info("rank %d: materialised the meta-device model shard by shard", self.rank)

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-steps before the last accumulate unsharded local gradients, with no reduce-scatter."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

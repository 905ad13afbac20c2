"""DeepSpeed ZeRO (stage 1, 2 or 3) behind the Strategy interface, with the update decided from outside.

The caller owns the accumulation boundary (`managed_gradient_accumulation: false`): every micro-step is
`engine.backward(loss, scale_wrt_gas=False)` (our loss is already normalised by the global label count),
so the number of micro-steps may change from step to step with the world size and the curriculum.

The guardian must see the global gradient norm before the update and may refuse the update. DeepSpeed
computes the norm inside `engine.step()`, together with the update, so the step is taken apart:

- `clip_grad_norm` runs the boundary half of `engine.step()` now: it finishes the gradient reduction
  (ZeRO-1 reduces here; ZeRO-2/3 partitioned gradients per micro-step and only finalise) and asks the ZeRO
  optimizer for the global norm, the same function its step() clips with.
- `optimizer_step` runs `engine.step()` with that reduction switched off, as it has already happened.
- a refused update (`zero_grad` with gradients pending) runs `engine.step()` through DeepSpeed's own
  overflow branch: the ZeRO optimizer drops its reduced gradients, leaves weights and optimizer state
  alone, and the engine counts a skipped step. The loss scale changes only if the gradients really
  overflowed (fp16).

Checkpoints are DeepSpeed's own files, written and read by raytrainer.checkpoint.deepspeed_io: each rank
writes its partitions, a load at the same world size reads only this rank's, and a load at another world
size goes through a universal checkpoint. What the step engine adds (the EMA) goes into a safetensors file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Collection
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from raytrainer.checkpoint import deepspeed_io
from raytrainer.config import Config
from raytrainer.train.strategy import Strategy

log = logging.getLogger("raytrainer.train")


def deepspeed_config(cfg: Config, device: torch.device) -> dict:
    """The DeepSpeed JSON config for our config; errors name the key that has no DeepSpeed equivalent."""
    p, prec = cfg.parallel, cfg.precision
    if prec.dtype == "fp8":
        raise ValueError("precision.dtype=fp8 is not supported with parallel.strategy=deepspeed; "
                         "use bf16, or parallel.strategy=fsdp for fp8")
    if cfg.optim.name != "adamw":
        raise ValueError(f"optim.name={cfg.optim.name} is not supported with parallel.strategy=deepspeed "
                         "(ZeRO is tested with AdamW); use optim.name=adamw")
    if cfg.train.ema_decay is not None and p.zero_stage == 3:
        raise ValueError("train.ema_decay needs whole parameters on every rank, which ZeRO-3 partitions; "
                         "use parallel.zero_stage=1 or 2, or parallel.strategy=fsdp, for an EMA")
    pin = device.type == "cuda"
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,  # bookkeeping only
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our AdamW steps on CPU tensors when offloaded
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    if prec.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif prec.dtype == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": round(math.log2(prec.initial_loss_scale)),
            "loss_scale_window": prec.loss_scale_growth_interval,
            "min_loss_scale": prec.min_loss_scale,
            "hysteresis": 1,
        }
    return config


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    owns_step = True  # DeepSpeed scales the fp16 loss, unscales, clips and steps itself
    checkpoint_index_files = ()  # which files a rank loads follows from their names alone

    def __init__(self, cfg: Config, module: nn.Module, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        import deepspeed

        from raytrainer.train.optim import build_optimizer

        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        if not dist.is_initialized():
            raise RuntimeError("parallel.strategy=deepspeed needs an initialised torch.distributed process "
                               "group (strategies.build_strategy creates one for a single process)")
        _prepare_environment(rank, world_size, self.device)
        module = module.to(self.device)
        if cfg.parallel.zero_stage == 3:  # lm_head's weight is gathered only inside lm_head: materialised logits
            module.loss_chunk_tokens = 0
        optimizer = build_optimizer(module, cfg)
        config = deepspeed_config(cfg, self.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.model = self.engine  # forward goes through the engine (ZeRO-3 fetches parameters there)
        self.module = self.engine.module
        self.stage = cfg.parallel.zero_stage
        self._check_optimizer()
        self._pending = False  # gradients accumulated since the last step or discard
        self._reduced = False  # the boundary reduction of those gradients already ran
        self._overflowed = False  # the pending gradients are not finite

    def _check_optimizer(self) -> None:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        expected = DeepSpeedZeroOptimizer_Stage3 if self.stage == 3 else DeepSpeedZeroOptimizer
        if not isinstance(self.optimizer, expected):
            raise RuntimeError(
                f"DeepSpeed wrapped the optimizer in {type(self.optimizer).__name__}, not "
                f"{expected.__name__}: the pre-step gradient norm and skipped updates are implemented for "
                "ZeRO's optimizers only"
            )

    # ---- one step
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self._pending = True

    def unscale_grads(self, scale: float) -> None:
        raise RuntimeError("DeepSpeed applies and removes its own loss scale (owns_step); "
                           "the step engine must not unscale its gradients")

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Reduce the accumulated gradients now and return their global norm; the clipping to max_norm
        happens inside DeepSpeed's step, with the same norm."""
        from deepspeed.runtime.utils import is_invalid_grad_norm
        from deepspeed.runtime.zero.stage3 import combine_grad_norm_groups

        self._finish_reduction()
        opt = self.optimizer
        opt.clip_grad = max_norm or 0.0
        if self.stage == 3:
            scaled = combine_grad_norm_groups(opt._get_norm_groups())
        else:
            scaled = opt.scaled_global_norm()
        # ZeRO reports a non-finite norm as -1
        norm = math.inf if is_invalid_grad_norm(scaled) else float(scaled) / opt.loss_scale
        self._overflowed = not math.isfinite(norm)
        return norm

    def optimizer_step(self) -> None:
        with self._reduction_done():
            self.engine.step()
        self._pending = False

    def zero_grad(self) -> None:
        """After a step there is nothing to clear; with gradients pending, the update is discarded."""
        if self._pending:
            self._discard()

    def _discard(self) -> None:
        opt = self.optimizer
        update_scale = opt._update_scale
        overflowed = self._overflowed

        def declare_overflow(has_overflow: bool = False) -> None:
            if overflowed:
                update_scale(True)  # a real fp16 overflow still lowers the loss scale
            opt.overflow = True

        with self._reduction_done(), _shadowed(opt, "_update_scale", declare_overflow):
            self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update that was meant to be discarded")
        self._pending = False

    def _finish_reduction(self) -> None:
        """The boundary work of engine.step() (unmanaged accumulation), ahead of the step itself."""
        if self._reduced:
            return
        engine = self.engine
        engine._running_engine_step = True  # is_gradient_accumulation_boundary() reads this
        try:
            if engine.zero_optimization_partition_gradients():
                engine.optimizer.finalize_gradient_accumulation_boundary()
            else:
                engine.allreduce_gradients()
        finally:
            engine._running_engine_step = False
        self._reduced = True

    @contextlib.contextmanager
    def _reduction_done(self):
        """engine.step() without the reduction that clip_grad_norm already ran (it must not run twice)."""
        if not self._reduced:
            yield
            return

        def skip(*args, **kwargs) -> None:
            return None

        try:
            with (_shadowed(self.engine, "allreduce_gradients", skip),
                  _shadowed(self.optimizer, "finalize_gradient_accumulation_boundary", skip)):
                yield
        finally:
            self._reduced = False
            self._overflowed = False

    # ---- checkpoints
    def stage_save(self, directory: Path, extra: dict | None = None) -> None:
        return None  # DeepSpeed writes its own files (and runs its own collectives) inside save()

    def save(self, directory: Path, extra: dict | None = None) -> None:
        deepspeed_io.save(self.engine, directory, self.rank, extra)

    def files_for_rank(self, directory: Path, names: Collection[str], saved_world_size: int,
                       extra: dict | None = None) -> set[str]:
        return deepspeed_io.files_for_rank(names, self.rank, saved_world_size, self.world_size)

    def load(self, directory: Path, saved_world_size: int, extra: dict | None = None) -> None:
        deepspeed_io.load(self.engine, directory, saved_world_size, self.world_size, self.rank, extra)
        self._pending = self._reduced = self._overflowed = False


@contextlib.contextmanager
def _shadowed(obj: object, name: str, replacement):
    """Temporarily replace one method of one object (an instance attribute shadows the class's method)."""
    object.__setattr__(obj, name, replacement)
    try:
        yield
    finally:
        object.__delattr__(obj, name)


def _prepare_environment(rank: int, world_size: int, device: torch.device) -> None:
    """What DeepSpeed reads from the environment (a launcher would set it), and no inference-only kernels."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    local_rank = device.index if device.type == "cuda" and device.index is not None else 0
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    import deepspeed.ops

    # The shared-memory all-reduce serves only inference_all_reduce; building it is a minute-long C++
    # compile on the first start of every CPU worker, for nothing training uses.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

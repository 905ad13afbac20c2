"""Mixed precision: autocast per dtype, dynamic loss scaling for fp16, float8 linears for fp8.

Parameters, gradients and optimizer state stay fp32 (the master weights) for every dtype; only the
forward/backward compute runs in the lower precision:

- fp32: no autocast.
- bf16: bf16 autocast. bf16 has fp32's exponent range, so no loss scaling.
- fp16: fp16 autocast and a DynamicLossScaler: the loss is multiplied by the scale before backward, the
  gradients are divided by it before clipping, and a step whose gradients overflowed is skipped while the
  scale halves; after `growth_interval` clean steps in a row the scale doubles.
- fp8:  torchao float8 training of the linear layers (CUDA, compute capability >= 8.9), bf16 autocast
  around them for everything else.
"""

from __future__ import annotations

import contextlib

import torch

from raytrainer.config import PrecisionConfig

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def autocast(dtype: str, device: torch.device):
    """The autocast context for precision.dtype on `device` (a no-op for fp32)."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"precision.dtype={dtype!r}: expected one of {sorted(AUTOCAST_DTYPES)}")
    compute = AUTOCAST_DTYPES[dtype]
    if compute is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute)


def check_precision_supported(dtype: str, device: torch.device) -> None:
    """Fail before training when the device cannot run precision.dtype, saying what would work."""
    if device.type != "cuda":
        if dtype == "fp8":
            raise RuntimeError(_fp8_unavailable("this worker has no CUDA device"))
        return
    if dtype in ("bf16", "fp8") and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"precision.dtype={dtype} needs bf16 support, which {torch.cuda.get_device_name(device)} "
                           "lacks (pre-Ampere GPU); use precision.dtype=fp16 (loss-scaled) or fp32")
    if dtype == "fp8":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise RuntimeError(_fp8_unavailable(
                f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}"))


def _fp8_unavailable(why: str) -> str:
    return (f"precision.dtype=fp8 needs a CUDA GPU with compute capability >= 8.9 (H100, H200, L4, L40S, "
            f"RTX 4090) and torchao; {why}. Use precision.dtype=bf16.")


def enable_fp8(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the linear layers for torchao Float8Linear (dynamic tensorwise scaling), in place."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    check_precision_supported("fp8", device)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise RuntimeError(_fp8_unavailable("torchao is not installed (pip install torchao)")) from e

    def eligible(module: torch.nn.Module, fqn: str) -> bool:
        if fqn.rsplit(".", 1)[-1] == "lm_head":  # its logits feed the loss directly: the most fp8-sensitive
            return False
        if isinstance(module, torch.nn.Linear):  # float8 matmuls need both dimensions divisible by 16
            return module.in_features % 16 == 0 and module.out_features % 16 == 0
        return True

    return convert_to_float8_training(model, module_filter_fn=eligible)


class DynamicLossScaler:
    """fp16 loss scaling: skip the step and halve on inf/NaN gradients, double after a clean stretch.

    Disabled (scale 1.0, update a no-op) for every other dtype."""

    def __init__(self, cfg: PrecisionConfig):
        self.enabled = cfg.dtype == "fp16"
        self.scale = float(cfg.initial_loss_scale) if self.enabled else 1.0
        self.growth_interval = cfg.loss_scale_growth_interval
        self.min_scale = float(cfg.min_loss_scale)
        self.clean_steps = 0  # consecutive steps without overflow since the last change of scale
        self.overflows = 0  # total, for logs

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def update(self, found_inf: bool) -> None:
        """After every step (applied or not): `found_inf` when the gradients of this step overflowed."""
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.min_scale, self.scale / 2)
            self.clean_steps = 0
            self.overflows += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "clean_steps": self.clean_steps,
                "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        if not self.enabled or not state or not state.get("enabled", True):
            return  # a checkpoint from another precision: keep this run's initial scale
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.overflows = int(state.get("overflows", 0))

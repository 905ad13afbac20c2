"""Mixed precision: autocast per dtype, and dynamic loss scaling for fp16."""

from __future__ import annotations

import contextlib

import torch

from raytrainer.config import PrecisionConfig


def autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()  # fp32; fp8 converts the linears instead (enable_fp8)


def enable_fp8(model: torch.nn.Module) -> torch.nn.Module:
    """torchao float8 training for the linear layers; needs a CUDA GPU of compute capability >= 8.9."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError(
            "precision.dtype=fp8 needs a CUDA GPU with compute capability >= 8.9 (H100, L4, ...); "
            "this worker has none. Use precision.dtype=bf16."
        )
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise RuntimeError("precision.dtype=fp8 needs torchao (pip install torchao)") from e
    # lm_head stays in bf16: its logits feed the loss directly and are the most sensitive to fp8
    return convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn != "lm_head")


class DynamicLossScaler:
    """fp16 loss scaling: skip the step and halve on inf/NaN gradients, double after a clean stretch."""

    def __init__(self, cfg: PrecisionConfig):
        self.enabled = cfg.dtype == "fp16"
        self.scale = cfg.initial_loss_scale if self.enabled else 1.0
        self.growth_interval = cfg.loss_scale_growth_interval
        self.min_scale = cfg.min_loss_scale
        self.clean_steps = 0

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.min_scale, self.scale / 2)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scale = state["scale"]
            self.clean_steps = state["clean_steps"]

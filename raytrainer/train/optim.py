"""AdamW (or Adafactor) over the model's parameter groups: decay / no-decay, per-group lr scales (muP)."""

from __future__ import annotations

import torch
from torch import nn

from raytrainer.config import Config


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = model.optimizer_groups(o.weight_decay)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = o.lr * g["lr_scale"]
    if o.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=o.lr, eps2=o.eps)
    # foreach on CPU; fused is the fast path on CUDA
    fused = all(p.is_cuda for g in groups for p in g["params"]) and torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None,
                             foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)

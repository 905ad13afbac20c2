"""AdamW (or Adafactor) over the model's parameter groups: decay / no-decay, per-group lr scales (muP).

The model decides the groups (`optimizer_groups(weight_decay)`: which parameters decay, and each group's
`lr_scale`); the optimizer keeps `lr_scale` on every group, and `set_lr` applies it on every lr change, so a
schedule value is always the lr of an unscaled group.
"""

from __future__ import annotations

import torch
from torch import nn

from raytrainer.config import Config


def default_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """For modules without `optimizer_groups`: matrices decay; biases, norm gains and embeddings do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    groups = model.optimizer_groups(weight_decay) if hasattr(model, "optimizer_groups") else None
    if groups is None:
        groups = default_groups(model, weight_decay)
    groups = [dict(g, params=list(g["params"])) for g in groups]
    seen: set[int] = set()
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"optimizer group {g.get('name', '?')!r} repeats a parameter that another "
                                 "group already holds; every parameter must be in exactly one group")
            seen.add(id(p))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"optimizer_groups left out trainable parameters {missing[:5]}: they would never train")
    return [part for g in groups for part in _split_sharded(g)]


def _split_sharded(group: dict) -> list[dict]:
    """A group holding both DTensors and plain tensors (expert parallel: split experts beside replicated
    weights) as two groups with the same settings: the multi-tensor kernels take one kind at a time."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in group["params"] if isinstance(p, DTensor)]
    if not sharded or len(sharded) == len(group["params"]):
        return [group]
    plain = [p for p in group["params"] if not isinstance(p, DTensor)]
    return [dict(group, params=plain), dict(group, params=sharded, name=f"{group.get('name', 'group')}_sharded")]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    for g in groups:
        g["lr"] = o.lr * g["lr_scale"]
    params = [p for g in groups for p in g["params"]]
    if o.name == "adafactor":
        # Adafactor's factored second moment replaces Adam's; optim.eps is its regularisation constant
        # for the second moment, the clipping epsilon keeps torch's default.
        return torch.optim.Adafactor(groups, lr=o.lr, eps=(o.eps, 1e-3), weight_decay=o.weight_decay,
                                     foreach=_foreach_supported(params))
    if o.name != "adamw":
        raise ValueError(f"optim.name={o.name!r}: expected adamw or adafactor")
    # fused is the fast path on CUDA; foreach (a few multi-tensor kernels instead of one per parameter)
    # everywhere else. DTensor (FSDP2) parameters support both.
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                             fused=True if fused else None, foreach=None if fused else _foreach_supported(params))


def _foreach_supported(params: list[torch.Tensor]) -> bool | None:
    return True if params and all(p.device.type in ("cpu", "cuda") for p in params) else None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = lr x its lr_scale (1.0 where a group has none)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)

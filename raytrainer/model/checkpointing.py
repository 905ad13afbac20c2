"""Activation checkpointing that leaves the module tree, and so every parameter name, untouched.

Instead of wrapping modules (which would add `_checkpoint_wrapped_module.` to state_dict keys), the
chosen modules get an instance-level `forward` that runs the original one under
torch.utils.checkpoint (non-reentrant). Calling again with another mode replaces the previous choice.

modes: none | full (every block) | every_n (blocks 0, n, 2n, ...) | selective (only each block's
attention or only its MLP is recomputed).
"""

from __future__ import annotations

import types

from torch import nn
from torch.utils.checkpoint import checkpoint

from raytrainer.config import ActivationCheckpointing


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward.__get__(self)  # the class's own forward, bound to this module
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_forward(module: nn.Module) -> None:
    # a bound method rather than a closure: copy.deepcopy (e.g. for an EMA model) rebinds it to the copy
    module.forward = types.MethodType(_checkpointed_forward, module)
    module._activation_checkpointed = True


def remove_checkpointing(module: nn.Module) -> None:
    if module.__dict__.pop("_activation_checkpointed", False):
        del module.__dict__["forward"]


def apply_activation_checkpointing(model: nn.Module, ac_cfg: ActivationCheckpointing) -> list[str]:
    """Checkpoint parts of `model.layers` per ac_cfg; returns the names of the checkpointed modules."""
    for module in model.modules():
        remove_checkpointing(module)
    chosen: list[tuple[str, nn.Module]] = []
    for i, block in enumerate(model.layers):
        if ac_cfg.mode == "full" or (ac_cfg.mode == "every_n" and i % ac_cfg.every_n == 0):
            chosen.append((f"layers.{i}", block))
        elif ac_cfg.mode == "selective":
            part = "self_attn" if ac_cfg.selective == "attention" else "mlp"
            chosen.append((f"layers.{i}.{part}", getattr(block, part)))
    for _, module in chosen:
        checkpoint_forward(module)
    return [name for name, _ in chosen]

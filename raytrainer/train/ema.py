"""Exponential moving average of the weights, outside the gradient path.

    shadow <- decay * shadow + (1 - decay) * param        after every applied optimizer step

The shadow is an fp32 copy of every parameter (whatever the parameters' dtype), keyed like
`named_parameters()` (a tied weight appears once). It works on the parameters it is given: for a sharded
model (FSDP2 DTensors) each rank keeps the shadow of its own shards, and DCP saves and reshards it like the
weights themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay}: must lie strictly between 0 and 1 (e.g. 0.999)")
        self.decay = decay
        self.params = dict(model.named_parameters())
        self.shadow = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        shadow = [self.shadow[n] for n in names]
        current = [self.params[n].detach() for n in names]
        if any(p.dtype != torch.float32 for p in current):
            current = [p.float() for p in current]
        # shadow += (1 - decay) * (param - shadow), a few multi-tensor kernels for the whole model
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors themselves (not copies): DCP loads into them in place."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]} (was it saved for another model config?)")
        for name, t in state.items():
            if t is not self.shadow[name]:
                self.shadow[name].copy_(t)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Evaluate with the EMA weights; the training weights come back afterwards (even on error)."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

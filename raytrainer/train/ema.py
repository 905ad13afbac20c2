"""Exponential moving average of the weights, outside the gradient path."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """fp32 shadow of every parameter; for sharded (DTensor) parameters the shadow is sharded alike."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = dict(model.named_parameters())
        self.shadow = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in state.items():
            self.shadow[name].copy_(t)

    @contextlib.contextmanager
    def swapped_in(self):
        """Evaluate with the EMA weights; the training weights come back afterwards."""
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

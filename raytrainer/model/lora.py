"""LoRA (Hu et al. 2021): a frozen model plus a trainable low-rank update on chosen projections,
W x + (alpha / rank) * B A dropout(x), with A [rank, in] random and B [out, rank] zero, so training starts
from the model as it was. The adapted projections keep their names (`q_proj.weight`) and gain `lora_a` and
`lora_b`; `merge_lora` folds the update into the weights, which is what an export writes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raytrainer.config import LoraConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, cfg: LoraConfig):
        # Built on the meta device (nothing allocated), then given the base projection's own tensors.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta",
                         dtype=base.weight.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.scale = cfg.alpha / cfg.rank
        self.dropout = cfg.dropout
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, cfg.rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.dropout(x, self.dropout, self.training) @ self.lora_a.t() @ self.lora_b.t()
        return super().forward(x) + self.scale * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        plain.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a))
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        return plain


def apply_lora(model: nn.Module, cfg: LoraConfig) -> tuple[int, int]:
    """Freeze `model` and put LoRA on every block projection named in cfg.targets; returns (trainable,
    total) parameter counts."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in cfg.targets:
                child = getattr(parent, name, None)
                if isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                    setattr(parent, name, LoRALinear(child, cfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """The adapted projections replaced by plain ones holding W + (alpha / rank) B A: the same function, the
    base model's names and shapes."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    return model

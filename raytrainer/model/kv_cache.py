"""Keys and values of the positions seen so far, so generation runs each new token through the model once.

One buffer per layer, [batch, kv_heads, max_len, head_dim], filled up to `length`. Prompts of different
lengths are left-padded: `valid` marks which slots hold real tokens, and the attention mask lets a query see
the valid keys at or before its own slot.
"""

from __future__ import annotations

import torch

from raytrainer.config import ModelConfig


class LayerCache:
    def __init__(self, owner: KVCache, k: torch.Tensor, v: torch.Tensor):
        self.owner, self.k, self.v = owner, k, v

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of the new positions [B, kv_heads, T, D] in; every key and value so far out."""
        start, end = self.owner.length, self.owner.length + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.layers = [LayerCache(self, torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0

    def begin(self, valid: torch.Tensor) -> torch.Tensor:
        """Before a forward over T new positions (`valid`: [B, T], False for left padding): the attention mask
        [B, 1, T, length + T], True where a query may attend."""
        T = valid.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} asked for")
        self.valid[:, self.length:end] = valid
        slots = torch.arange(end, device=valid.device)[None, :]
        own = (self.length + torch.arange(T, device=valid.device))[:, None]  # each query's own slot
        mask = (slots <= own)[None, None] & self.valid[:, None, None, :end]
        # A query on a padding slot sees nothing; let it see itself so softmax stays finite (its output is unused).
        return mask | (slots == own)[None, None]

    def end(self, T: int) -> None:
        self.length += T

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (beam search: each surviving beam takes its parent's past)."""
        for layer in self.layers:
            layer.k.copy_(layer.k[index])
            layer.v.copy_(layer.v[index])
        self.valid.copy_(self.valid[index])

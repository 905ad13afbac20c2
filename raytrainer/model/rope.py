"""Rotary position embeddings in the rotate_half (non-interleaved) convention of Hugging Face Llama.

Frequencies follow `transformers`' rope initialisers, so a checkpoint exported with the matching
`rope_scaling` entry reproduces these logits exactly:
- plain:  inv_freq[i] = theta^(-2i / head_dim)
- linear: position interpolation, inv_freq / factor
- yarn:   NTK-by-parts (high-frequency dims kept, low-frequency dims interpolated, a linear ramp
          between) plus YaRN's attention temperature: cos and sin are multiplied by
          mscale = 0.1 * ln(factor) + 1, which scales q.k by mscale^2 = 1/t.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raytrainer import kernels
from raytrainer.config import ModelConfig, RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the factor applied to cos/sin (1.0 except for YaRN)."""
    # fp32 like `transformers`, so exported checkpoints see the very same angles
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    if scaling.kind == "linear":
        return inv_freq / scaling.factor, 1.0

    # YaRN. A dim whose wavelength fits beta_fast times into the original context keeps its frequency
    # (extrapolation); one that fits fewer than beta_slow times is interpolated; a ramp joins the two.
    def dim_for_rotations(rotations: float) -> float:
        wavelengths = scaling.original_max_seq_len / (rotations * 2 * math.pi)
        return head_dim * math.log(wavelengths) / (2 * math.log(theta))

    low = max(math.floor(dim_for_rotations(scaling.beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: original frequency, 0: interpolated
    inv_freq = inv_freq / scaling.factor * (1 - keep) + inv_freq * keep
    mscale = 0.1 * math.log(scaling.factor) + 1.0
    return inv_freq, mscale


class RotaryEmbedding(nn.Module):
    """Maps position ids [B, T] to (cos, sin) [B, T, head_dim], computed in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim, self.theta, self.scaling = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
        # not persistent: derived from the config, and HF checkpoints do not carry it either
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.mscale = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        inv_freq, self.mscale = rope_frequencies(self.head_dim, self.theta, self.scaling)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq.to(self.inv_freq.device))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, head_dim / 2]
            angles = torch.cat((freqs, freqs), dim=-1)
            return angles.cos() * self.mscale, angles.sin() * self.mscale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, head_dim]; cos, sin: [B, T, head_dim]."""
    if kernels.enabled(x):
        return kernels.rope(x, cos, sin)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin

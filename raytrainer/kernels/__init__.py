"""Triton kernels for the model's elementwise and row-wise pieces, each with its torch reference beside it.

    rms_norm(x, weight, eps)                   RMSNorm forward and backward, one pass over each row
    swiglu(gate, up)                           silu(gate) * up, forward and backward without the silu tensor
    rope(x, cos, sin)                          rotary embedding of [B, T, heads, head_dim] (backward: the inverse)
    cross_entropy(logits, labels, smoothing)   per-token objective, logsumexp and CE in one pass over the
                                               vocabulary; the backward writes the logits' gradient row by row

The model calls `enabled(tensor)` and uses a kernel where it says so: on a CUDA tensor (not a DTensor) when
Triton is installed, outside torch.compile (which fuses these itself) and unless RAYTRAINER_KERNELS=torch.
Elsewhere the torch code runs, so a CPU machine never needs Triton. Tests run the kernels on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are defined) against the torch references.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def enabled(x: torch.Tensor) -> bool:
    """Whether the model should run a Triton kernel on `x` rather than the torch code."""
    if os.environ.get("RAYTRAINER_KERNELS", "auto") == "torch" or torch.compiler.is_compiling():
        return False
    from torch.distributed.tensor import DTensor

    # a DTensor (tensor parallel's sequence-split activations) goes through DTensor's own torch ops
    return x.is_cuda and not isinstance(x, DTensor) and triton_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from raytrainer.kernels.norm import rms_norm as kernel

    return kernel(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from raytrainer.kernels.gating import swiglu as kernel

    return kernel(gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from raytrainer.kernels.rotary import rope as kernel

    return kernel(x, cos, sin)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from raytrainer.kernels.loss import cross_entropy as kernel

    return kernel(logits, labels, label_smoothing)

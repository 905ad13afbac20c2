"""Rotary embedding of x [B, T, heads, head_dim] with cos, sin [B, T, head_dim] whose two halves are equal (as
raytrainer.model.rope makes them): y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin. A rotation: its backward is the
same kernel with the sine negated. One program per (b, t, head) row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, half, sign, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # (b * T + t) * heads + h
    position = row // heads
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    base = row * 2 * half
    x1 = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + half + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + position * 2 * half + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + position * 2 * half + cols, mask=mask, other=0.0).to(tl.float32) * sign
    tl.store(y_ptr + base + cols, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + base + half + cols, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, T, H, D = x.shape
    x = x.contiguous()
    # the torch path rounds cos and sin to x's dtype first
    cos = cos.to(x.dtype).expand(B, T, D).contiguous()
    sin = sin.to(x.dtype).expand(B, T, D).contiguous()
    y = torch.empty_like(x)
    _rotate[(B * T * H,)](x, cos, sin, y, H, D // 2, sign, BLOCK=triton.next_power_of_2(D // 2))
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _apply(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _apply(dy, cos, sin, -1.0), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _Rope.apply(x, cos, sin)

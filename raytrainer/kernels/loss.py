"""Cross-entropy per token in one pass over the vocabulary (an online logsumexp), without an fp32 copy of the
logits; the backward writes each row's gradient, softmax minus the target distribution, in the logits' dtype.

    objective, lse, ce = cross_entropy(logits [N, V], labels [N], label_smoothing)

objective = lse - (1 - s) x_label - s mean(x) (torch's label smoothing), differentiable; lse (differentiable:
the z-loss squares it) and the plain ce = lse - x_label, not. Rows whose label is IGNORE_INDEX give 0."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
BLOCK = 4096


@triton.jit
def _forward(x_ptr, labels_ptr, obj_ptr, lse_ptr, ce_ptr, V, smoothing, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    base = x_ptr + row.to(tl.int64) * V
    running_max = -float("inf")
    running_sum = 0.0
    total = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
        total += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
    lse = running_max + tl.log(running_sum)
    valid = label != IGNORE
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    ce = lse - target
    objective = lse - (1.0 - smoothing) * target - smoothing * total / V
    tl.store(obj_ptr + row, tl.where(valid, objective, 0.0))
    tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _backward(x_ptr, labels_ptr, lse_ptr, g_obj_ptr, g_lse_ptr, dx_ptr, V, smoothing, IGNORE: tl.constexpr,
              BLOCK: tl.constexpr):
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    valid = label != IGNORE
    g_obj = tl.where(valid, tl.load(g_obj_ptr + row), 0.0)
    g_lse = tl.load(g_lse_ptr + row)
    lse = tl.load(lse_ptr + row)
    offset = row.to(tl.int64) * V
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        target = tl.where(cols == label, 1.0 - smoothing, 0.0) + smoothing / V
        dx = g_obj * (p - target) + g_lse * p
        tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, smoothing: float):
        logits, labels = logits.contiguous(), labels.contiguous()
        N, V = logits.shape
        objective = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse, ce = torch.empty_like(objective), torch.empty_like(objective)
        _forward[(N,)](logits, labels, objective, lse, ce, V, smoothing, IGNORE=IGNORE_INDEX,
                       BLOCK=min(BLOCK, triton.next_power_of_2(V)))
        ctx.save_for_backward(logits, labels, lse)
        ctx.smoothing = smoothing
        ctx.mark_non_differentiable(ce)
        return objective, lse, ce

    @staticmethod
    def backward(ctx, g_obj: torch.Tensor, g_lse: torch.Tensor, _g_ce: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        N, V = logits.shape
        g_obj = torch.zeros_like(lse) if g_obj is None else g_obj.float().contiguous()
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.float().contiguous()
        dx = torch.empty_like(logits)
        _backward[(N,)](logits, labels, lse, g_obj, g_lse, dx, V, ctx.smoothing, IGNORE=IGNORE_INDEX,
                        BLOCK=min(BLOCK, triton.next_power_of_2(V)))
        return dx, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _CrossEntropy.apply(logits, labels, label_smoothing)

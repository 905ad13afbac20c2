"""The loss over logits split by vocabulary across a tensor-parallel group, never gathered whole.

Each rank holds logits[:, v0:v0 + V/tp]. Three all-reduces over the group give what the loss needs: the max
(for a stable exp), the sum of exps (so logsumexp), and the target's logit (from the one rank whose slice
holds it); label smoothing adds a fourth (the sum of the logits, for their mean). Every rank then has the same
loss, and the backward is local: softmax - one-hot (and the smoothing and z-loss terms) on its own slice, as
in Megatron-LM's vocab-parallel cross-entropy.

Same terms as raytrainer.model.loss.token_loss_sums (label smoothing, z-loss, ignored positions), and every
token's CE comes along (what per-document blame reads, since no rank has the whole logits).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from raytrainer.model.loss import IGNORE_INDEX, LossSums


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, vocab_size: int,
                group: dist.ProcessGroup, label_smoothing: float, z_loss_weight: float):
        logits = logits.float()
        local = logits.shape[-1]
        peak = logits.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(logits - peak[:, None])
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        lse = peak + sum_exp.log()
        mine = (labels >= vocab_start) & (labels < vocab_start + local)
        target = torch.where(mine, logits.gather(1, (labels - vocab_start).clamp(0, local - 1)[:, None])[:, 0],
                             torch.zeros_like(lse))
        dist.all_reduce(target, group=group)
        valid = labels != IGNORE_INDEX
        ce = torch.where(valid, lse - target, torch.zeros_like(lse))
        objective = (1 - label_smoothing) * ce
        if label_smoothing > 0:  # smoothing's term: lse - the mean logit over the whole vocabulary
            total = logits.sum(-1)
            dist.all_reduce(total, group=group)
            objective = objective + label_smoothing * torch.where(valid, lse - total / vocab_size, 0.0)
        z = torch.where(valid, lse.square(), torch.zeros_like(lse))
        if z_loss_weight > 0:
            objective = objective + z_loss_weight * z
        ctx.save_for_backward(exp / sum_exp[:, None], labels - vocab_start, mine, valid, lse)
        ctx.settings = (label_smoothing, z_loss_weight, vocab_size, local)
        return objective, ce, z

    @staticmethod
    def backward(ctx, grad_objective: torch.Tensor, _grad_ce, _grad_z):
        probs, local_labels, mine, valid, lse = ctx.saved_tensors
        label_smoothing, z_loss_weight, vocab_size, local = ctx.settings
        # d objective / d logits on this rank's slice: softmax - (1 - eps) one-hot - eps / V, + 2 w lse softmax
        grad = probs * (1.0 + 2.0 * z_loss_weight * lse[:, None]) - label_smoothing / vocab_size
        rows = torch.nonzero(mine, as_tuple=True)[0]
        grad[rows, local_labels[rows]] -= 1.0 - label_smoothing
        grad = grad * torch.where(valid, grad_objective, 0.0)[:, None]
        return grad, None, None, None, None, None, None


def vocab_parallel_loss_sums(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                             z_loss_weight: float = 0.0, *, vocab_start: int, vocab_size: int,
                             group: dist.ProcessGroup) -> LossSums:
    """token_loss_sums for this rank's slice of the logits [..., V/tp] (vocabulary ids vocab_start onwards)."""
    flat_labels = labels.reshape(-1)
    objective, ce, z = _VocabParallelLoss.apply(logits.reshape(-1, logits.shape[-1]), flat_labels, vocab_start,
                                                vocab_size, group, label_smoothing, z_loss_weight)
    ce = ce.detach()
    return LossSums(objective=objective.sum(), ce=ce.sum(), z=z.detach().sum() if z_loss_weight > 0 else
                    torch.zeros((), device=logits.device), count=(flat_labels != IGNORE_INDEX).sum(),
                    token_ce=ce.reshape(labels.shape))

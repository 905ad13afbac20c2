"""Training loss: cross-entropy with label smoothing, PaLM's z-loss and multi-token-prediction terms.

Every term is a *sum* over label tokens divided by one normaliser: the caller's `loss_normalizer` (the
engine passes global label tokens / world size, so gradients do not depend on how the global batch is
split) or, when None, this micro-batch's label-token count (a plain mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raytrainer import kernels

IGNORE_INDEX = -100


@dataclass
class LossSums:
    objective: torch.Tensor  # what is optimised: smoothed CE (+ z-loss term), summed over label tokens
    ce: torch.Tensor  # plain CE sum, detached, for logging
    z: torch.Tensor  # sum of logsumexp(logits)^2, detached (0 when the z-loss is off)
    count: torch.Tensor  # label tokens (int64)
    token_ce: torch.Tensor | None = None  # every token's CE, detached, where the logits are not whole to read it


def token_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, z_loss_weight: float = 0.0
) -> LossSums:
    """logits [..., V], labels [...] with IGNORE_INDEX for ignored positions. Computed in fp32. The plain
    case is torch's fused cross-entropy (one log-softmax, its own backward); the logsumexp that smoothing and
    the z-loss need is computed only when one of them is on."""
    if kernels.enabled(logits):
        return _kernel_loss_sums(logits, labels, label_smoothing, z_loss_weight)
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    # reduction="none" keeps shapes static (no boolean indexing: no host sync, compile-friendly); ignored
    # positions come out as 0
    objective = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none",
                                label_smoothing=label_smoothing)
    zero = torch.zeros((), device=logits.device)
    z = zero
    if label_smoothing > 0 or z_loss_weight > 0:
        lse = torch.logsumexp(logits, dim=-1)
    if z_loss_weight > 0:
        z = torch.where(valid, lse.pow(2), zero)
        objective = objective + z_loss_weight * z
    if label_smoothing > 0:  # the objective is smoothed: the plain CE, for logging, without a graph
        with torch.no_grad():
            ce = torch.where(valid, lse - logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), zero)
    else:
        ce = objective.detach() if z_loss_weight == 0 else (objective - z_loss_weight * z).detach()
    return LossSums(
        objective=torch.where(valid, objective, zero).sum(),
        ce=ce.sum(),
        z=z.detach().sum(),
        count=valid.sum(),
    )


def _kernel_loss_sums(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                      z_loss_weight: float) -> LossSums:
    """token_loss_sums through the Triton cross-entropy: one pass over the vocabulary, no fp32 copy of the logits."""
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    objective, lse, ce = kernels.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, label_smoothing)
    zero = torch.zeros((), device=logits.device)
    z = torch.where(valid, lse.square(), zero) if z_loss_weight > 0 else zero
    if z_loss_weight > 0:
        objective = objective + z_loss_weight * z
    return LossSums(objective=objective.sum(), ce=ce.sum(), z=z.detach().sum(), count=valid.sum())


def token_ce(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy [...] in fp32, 0 at ignored positions; a chunk of tokens at a time, so a large
    vocabulary never needs a full fp32 copy of the logits."""
    flat_logits = logits.detach().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=logits.device)
    for i in range(0, flat_labels.numel(), chunk_tokens):
        out[i:i + chunk_tokens] = torch.nn.functional.cross_entropy(
            flat_logits[i:i + chunk_tokens].float(), flat_labels[i:i + chunk_tokens], ignore_index=IGNORE_INDEX,
            reduction="none")
    return out.reshape(labels.shape)


def shift_labels(labels: torch.Tensor, doc_ids: torch.Tensor | None, k: int) -> torch.Tensor:
    """Targets k positions further ahead: out[:, t] = labels[:, t + k], ignored where t + k lies past
    the row or in another document (doc_ids None: the row is one document)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    if k >= labels.shape[1]:
        return out
    ahead = labels[:, k:]
    if doc_ids is not None:
        ahead = ahead.masked_fill(doc_ids[:, k:] != doc_ids[:, :-k], IGNORE_INDEX)
    out[:, :-k] = ahead
    return out


def compute_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    mtp_logits: list[torch.Tensor] | None = None,
    mtp_weight: float = 0.0,
    doc_ids: torch.Tensor | None = None,
    loss_normalizer: float | None = None,
    sums=token_loss_sums,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar loss and detached metrics (ce, label_tokens, and z_loss / mtp_ce when in use).

    mtp_logits[k - 1] predicts the token k positions beyond the main head's target; the MTP term is
    mtp_weight times the mean over heads of their (smoothed) CE sums. `sums` computes the main head's sums
    (a tensor-parallel model's logits are split by vocabulary, and so is their loss).
    """
    main = sums(logits, labels, label_smoothing, z_loss_weight)
    mtp = [token_loss_sums(head, shift_labels(labels, doc_ids, k), label_smoothing)
           for k, head in enumerate(mtp_logits or [], start=1)]
    return combine_loss(main, mtp, z_loss_weight=z_loss_weight, mtp_weight=mtp_weight,
                        loss_normalizer=loss_normalizer)


def combine_loss(main: LossSums, mtp: list[LossSums], *, z_loss_weight: float = 0.0, mtp_weight: float = 0.0,
                 loss_normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar loss and its metrics from the main head's sums and each MTP head's."""
    count = main.count.clamp(min=1)  # an all-ignored micro-batch gives loss 0, not NaN
    metrics = {"ce": main.ce / count, "label_tokens": main.count.detach()}
    if main.token_ce is not None:
        metrics["token_ce"] = main.token_ce
    total = main.objective
    if z_loss_weight > 0:
        metrics["z_loss"] = main.z / count
    if mtp:
        total = total + mtp_weight / len(mtp) * sum(s.objective for s in mtp)
        metrics["mtp_ce"] = sum(s.ce / s.count.clamp(min=1) for s in mtp) / len(mtp)
    normalizer = count if loss_normalizer is None else loss_normalizer
    return total / normalizer, metrics

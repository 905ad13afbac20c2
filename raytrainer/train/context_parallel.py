"""Context parallel: every row's sequence split over the cp ranks of a replica, attention across the split by an
all-gather of keys and values (Llama 3's choice for document-masked attention: the mask of a packed row is
irregular, which a ring of key/value blocks handles badly, and the gathered keys are small beside the queries'
work once heads share them, GQA).

    parallelize(...) -> apply_context_parallel(model, cp_mesh)      each layer's attention gathers k, v
    inputs = shard_sequence(inputs, cp_rank, cp)                   a micro-batch's share of each row

Causal load balancing: the sequence is cut into 2·cp chunks, and rank r holds chunks r and 2·cp - 1 - r (a
zigzag), so that every rank's queries see as many keys in all: with contiguous slices the last rank would do
cp times the first's work. Positions (RoPE) and document ids travel with the tokens, so a token's position and
document are what they would be unsplit.

Every rank computes the loss of its own tokens; the step engine normalises it by the global label-token count
over dp x cp ranks, and data parallel (DDP over the whole world) averages the gradients over those ranks. The
gathers' backward (a reduce-scatter) brings each rank the gradients of its keys and values from every rank that
attended to them, so the gradients are those of the unsplit row.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from raytrainer.model.attention import AttentionMask, attention


def zigzag_positions(T: int, cp: int, rank: int) -> torch.Tensor:
    """The indices (into a row of T tokens) rank `rank` of `cp` holds, in the order it holds them."""
    chunk = T // (2 * cp)
    first, second = rank, 2 * cp - 1 - rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


@functools.lru_cache(maxsize=32)
def _unzigzag(T: int, cp: int) -> torch.Tensor:
    """For the ranks' shares concatenated in rank order: where each of a row's T tokens is among them."""
    held = torch.cat([zigzag_positions(T, cp, r) for r in range(cp)])
    return torch.argsort(held)


def shard_sequence(batch: dict[str, torch.Tensor], rank: int, cp: int) -> dict[str, torch.Tensor]:
    """This rank's share of every row of a micro-batch (tokens, labels, positions, document ids)."""
    T = batch["input_ids"].shape[1]
    if T % (2 * cp):
        raise ValueError(f"a row of {T} tokens does not split into 2 x parallel.cp={cp} equal chunks")
    out = dict(batch)
    if out.get("position_ids") is None:  # the positions a whole row would have had
        out["position_ids"] = torch.arange(T, device=batch["input_ids"].device).expand_as(batch["input_ids"])
    index = zigzag_positions(T, cp, rank).to(batch["input_ids"].device)
    return {k: (v.index_select(1, index) if isinstance(v, torch.Tensor) and v.dim() >= 2 else v)
            for k, v in out.items()}


def gather_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup, cp: int) -> torch.Tensor:
    """Every rank's share of the sequence (dimension `dim`) back in a row's order; differentiable (its backward
    returns each rank the gradient of its own share, summed over the ranks that used it)."""
    from torch.distributed._functional_collectives import all_gather_tensor_autograd, wait_tensor

    gathered = all_gather_tensor_autograd(x.contiguous(), gather_dim=dim, group=group)
    gathered = wait_tensor(gathered) if not isinstance(gathered, torch.Tensor) else gathered
    return gathered.index_select(dim, _unzigzag(gathered.shape[dim], cp).to(x.device))


class ContextParallelAttention:
    """A layer's attention with its queries local and its keys and values gathered from the whole row."""

    def __init__(self, group: dist.ProcessGroup, cp: int, rank: int):
        self.group, self.cp, self.rank = group, cp, rank

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                 mask: AttentionMask) -> torch.Tensor:
        local = q.shape[2]
        T = local * self.cp
        k = gather_sequence(k, 2, self.group, self.cp)
        v = gather_sequence(v, 2, self.group, self.cp)
        queries = zigzag_positions(T, self.cp, self.rank).to(q.device)
        keys = torch.arange(T, device=q.device)
        if mask.causal:
            allowed = (keys[None, :] <= queries[:, None])[None]
        else:
            allowed = torch.ones(1, local, T, dtype=torch.bool, device=q.device)
        if mask.doc_ids is not None:
            with torch.no_grad():
                docs = gather_sequence(mask.doc_ids, 1, self.group, self.cp)
            allowed = allowed & (mask.doc_ids[:, :, None] == docs[:, None, :])
        return attention(q, k, v, scale=scale, mask=AttentionMask("sdpa", mask.causal, dense=allowed[:, None]))


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    attend = ContextParallelAttention(cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank())
    for block in model.layers:
        block.self_attn.attend = attend

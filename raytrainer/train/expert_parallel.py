"""Expert parallel: each rank of an expert-parallel group holds n_experts / ep of every MoE layer's experts,
and routed tokens travel to the rank holding their expert and back by all-to-all.

    shard_experts(model, ep_mesh)      every MoE layer keeps its slice of experts (a DTensor, Shard(0) over
                                       mesh["ep"]) and dispatches through AllToAllDispatch
    sync_expert_gradients(model, ...)  after the last micro-step: the experts' gradients summed over the ranks
                                       holding the same slice, and scaled like data parallel's average

Expert-parallel ranks are data-parallel ranks (each trains on its own rows). A token's gradient reaches its
expert through the all-to-all's backward, so an expert's local gradient already sums every rank of its group;
what data parallel's all-reduce does for the other parameters (a mean over every replica), the experts get from
sync_expert_gradients. DCP stores the slices by global offset, so a checkpoint loads at any ep (or none).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from raytrainer.model.moe import MoE, run_experts


class AllToAllDispatch:
    """Routed rows (grouped by global expert) to the ranks holding their experts, through them, and back."""

    def __init__(self, ep_mesh: DeviceMesh, n_experts: int):
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.local = n_experts // self.ep

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        # counts [n_experts]: this rank's rows per global expert; rank r holds experts [r * local, (r + 1) * local)
        send = counts.reshape(self.ep, self.local)
        received = torch.empty_like(send)  # received[s, i]: rows source rank s sends for my local expert i
        dist.all_to_all_single(received, send, group=self.group)
        send_splits, recv_splits = send.sum(1).tolist(), received.sum(1).tolist()
        rows = all_to_all_single_autograd(x, recv_splits, send_splits, self.group)
        # arrived grouped by source rank, then expert: regroup by expert for the local weights, and back after
        by_expert = _source_major_to_expert_major(received)
        out = run_experts(rows[by_expert], received.sum(0).tolist(), _local(experts.gate_proj),
                          _local(experts.up_proj), _local(experts.down_proj))
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
        return all_to_all_single_autograd(out[back], send_splits, recv_splits, self.group)


def _source_major_to_expert_major(counts: torch.Tensor) -> torch.Tensor:
    """The permutation taking rows laid out [source][expert] (counts[s, e] each) to [expert][source]."""
    starts = (torch.cumsum(counts.reshape(-1), 0) - counts.reshape(-1)).reshape(counts.shape)
    pieces = [torch.arange(int(starts[s, e]), int(starts[s, e] + counts[s, e]))
              for e in range(counts.shape[1]) for s in range(counts.shape[0])]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def shard_experts(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Every MoE layer keeps its rank's slice of experts (built whole from the run's seed on every rank)."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(distribute_tensor(full.detach(), ep_mesh, [Shard(0)])))
        moe.dispatch = AllToAllDispatch(ep_mesh, moe.n_experts)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if isinstance(p, DTensor)]


def sync_expert_gradients(model: nn.Module, replica_group: dist.ProcessGroup | None, replicas: int,
                          data_parallel: int) -> None:
    """The experts' gradients summed over the expert-parallel groups (`replicas` of them, each holding every
    expert once) and divided by the data-parallel world: the mean over every rank's rows, as for the others."""
    for p in expert_parameters(model):
        if p.grad is None:
            continue
        grad = p.grad.to_local()
        if replicas > 1:
            dist.all_reduce(grad, group=replica_group)
        grad.div_(data_parallel)

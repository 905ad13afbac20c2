"""A mixture-of-experts MLP: a router sends each token to top_k of n SwiGLU experts.

    y = sum over the token's chosen experts e of  weight_e * expert_e(x)   (+ shared experts, for every token)

Routing: scores over the experts (softmax, or DeepSeek-V3's sigmoid affinities with score=sigmoid); the top_k
are chosen (with balance=bias, on the scores plus a per-expert bias that only steers the choice) and their
scores, renormalised to sum to 1, weigh the outputs.

Balancing, one of:
- aux_loss (Switch Transformer / GShard): n_experts * sum_e f_e * P_e, where f_e is the fraction of routed
  slots that went to expert e and P_e its mean score; 1 at a perfectly even load, and its gradient (through
  P_e) pushes scores away from overloaded experts.
- bias (DeepSeek-V3, auxiliary-loss-free): after every applied step each expert's bias moves by
  bias_update_rate towards equal load (up when it had fewer tokens than the mean, down when more), from the
  load summed over every rank (`update_balance_bias`). No gradient is involved.
Router z-loss (ST-MoE): mean logsumexp(router logits)^2, keeping the router's logits small.

Capacity (capacity_factor set): an expert takes at most ceil(top_k * tokens / n_experts * factor) tokens of a
micro-batch, in token order; the rest of its slots are dropped (the token keeps its other experts and the
residual stream). Dropless without it.

The experts' weights are stacked ([n_experts, out, in]), so expert parallelism can give each rank a slice of
them; the layer only ever loops over the experts it holds (`expert_slice`) and asks `dispatch` to move
tokens to and from the ranks that hold the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raytrainer.config import ModelConfig


@dataclass
class RoutingStats:
    """One layer's routing of one forward: its balancing terms (with gradients) and its load (detached)."""

    aux_loss: torch.Tensor  # load-balancing loss (0 with balance=bias)
    z_loss: torch.Tensor  # router z-loss
    load: torch.Tensor  # [n_experts] slots routed to each expert (before capacity)
    dropped: torch.Tensor  # slots dropped by the capacity limit


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.n_experts, self.top_k, self.balance, self.score = moe.n_experts, moe.top_k, moe.balance, moe.score
        self.gate = nn.Linear(cfg.d_model, moe.n_experts, bias=False)
        # DeepSeek-V3's balancing bias: state of the run (checkpointed), changed only by update_balance_bias
        self.register_buffer("bias", torch.zeros(moe.n_experts, dtype=torch.float32))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [N, d] -> (weights [N, k], experts [N, k], aux loss, z loss)."""
        logits = self.gate(h).float()
        scores = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        choosing = scores + self.bias if self.balance == "bias" else scores
        experts = choosing.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        if self.balance == "aux_loss":
            slots = torch.zeros_like(scores).scatter_(1, experts, 1.0)
            fraction = slots.mean(0) / self.top_k  # f_e: the share of routed slots expert e got
            share = scores / scores.sum(dim=-1, keepdim=True)  # P_e from each token's scores summing to 1
            aux = self.n_experts * (fraction * share.mean(0)).sum()
        else:
            aux = logits.new_zeros(())
        return weights.type_as(h), experts, aux, z_loss


class Experts(nn.Module):
    """n SwiGLU experts as stacked weights; each weight reads like nn.Linear's ([out, in]) per expert."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [sum(counts), d], grouped by expert (counts[i] rows for the i-th expert held here)."""
        return run_experts(x, counts, self.gate_proj, self.up_proj, self.down_proj)


def run_experts(x: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Expert i's SwiGLU (weights gate[i], up[i], down[i]) on its counts[i] rows of x, in order."""
    out = []
    for i, xe in enumerate(x.split(counts)):
        if xe.shape[0]:
            out.append(F.linear(F.silu(F.linear(xe, gate[i])) * F.linear(xe, up[i]), down[i]))
    return torch.cat(out) if out else x.new_zeros(0, down.shape[1])


def local_dispatch(x: torch.Tensor, counts: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Every expert is here: run them on their rows (grouped by expert) and return the outputs in that order."""
    return experts(x, counts.tolist())


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from raytrainer.model.transformer import MLP

        moe = cfg.moe
        self.n_experts, self.top_k, self.capacity_factor = moe.n_experts, moe.top_k, moe.capacity_factor
        self.router = Router(cfg)
        self.experts = Experts(moe.n_experts, cfg.d_model, cfg.expert_hidden_dim)
        self.shared = MLP(cfg, hidden=cfg.expert_hidden_dim * moe.shared_experts) if moe.shared_experts else None
        # How routed rows reach the experts: all here, or (expert parallel) through an all-to-all; set by
        # raytrainer.train.parallelize, never by the model
        self.dispatch = local_dispatch
        self.stats: RoutingStats | None = None  # the last forward's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, experts, aux, z_loss = self.router(h)
        slots = experts.reshape(-1)  # token t's j-th choice is slot t * top_k + j
        load = torch.bincount(slots, minlength=self.n_experts)
        order = slots.argsort(stable=True)  # slots grouped by expert, in token order within each
        counts = load
        if self.capacity_factor is not None:
            capacity = math.ceil(self.top_k * h.shape[0] / self.n_experts * self.capacity_factor)
            place = torch.arange(order.numel(), device=h.device) - (torch.cumsum(load, 0) - load)[slots[order]]
            order = order[place < capacity]  # an expert's first `capacity` slots in token order
            counts = load.clamp(max=capacity)
        tokens = order // self.top_k
        routed = self.dispatch(h[tokens], counts, self.experts)
        y = torch.zeros_like(h).index_add_(0, tokens, routed * weights.reshape(-1)[order, None])
        if self.shared is not None:
            y = y + self.shared(h)
        self.stats = RoutingStats(aux, z_loss, load.detach(), (load - counts).sum().detach())
        return y.reshape(shape)


@torch.no_grad()
def update_balance_bias(model: nn.Module, load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's balancing step: each MoE layer's expert bias up by `rate` where the expert had fewer tokens
    than the mean of the step's load (summed over every rank), down where it had more. load: [layers, experts]."""
    routers = [m for m in model.modules() if isinstance(m, Router) and m.balance == "bias"]
    for router, layer_load in zip(routers, load, strict=True):
        router.bias += rate * torch.sign(layer_load.mean() - layer_load).to(router.bias)

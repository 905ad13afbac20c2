"""Optimizer construction: decay / no-decay groups, lr_scale kept and applied, AdamW defaults, Adafactor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raytrainer.config import load_config
from raytrainer.model import Transformer
from raytrainer.train.optim import build_optimizer, set_lr

TINY = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.multiple_of=32",
        "model.max_seq_len=32", "train.seq_len=32", "train.global_batch_tokens=128"]


def groups_by_param_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of[id(p)] for name, p in model.named_parameters()}


class StandIn(nn.Module):
    """A module without optimizer_groups: embeddings, a biased linear, a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


def test_transformer_groups_exclude_norms_and_embeddings_from_weight_decay():
    cfg = load_config(None, [*TINY, "model.tie_embeddings=false", "model.qk_norm=true"])
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg)
    groups = groups_by_param_name(model, optimizer)
    assert len(groups) == len(list(model.parameters()))  # every parameter is in exactly one group
    for name, group in groups.items():
        no_decay = "embed_tokens" in name or "norm" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.1), name
        assert group["lr_scale"] == 1.0
    assert groups["lm_head.weight"]["weight_decay"] == 0.1  # untied output matrix decays
    assert groups["layers.0.self_attn.q_norm.weight"]["weight_decay"] == 0.0


def test_stand_in_module_without_optimizer_groups_gets_biases_norms_and_embeddings_undecayed():
    cfg = load_config(None, TINY)
    model = StandIn()
    groups = groups_by_param_name(model, build_optimizer(model, cfg))
    assert groups["proj.weight"]["weight_decay"] == 0.1
    for name in ("proj.bias", "norm.weight", "norm.bias", "embed.weight"):
        assert groups[name]["weight_decay"] == 0.0, name


def test_adamw_defaults_from_config():
    cfg = load_config(None, TINY)
    optimizer = build_optimizer(Transformer(cfg.model), cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert optimizer.defaults["weight_decay"] == 0.1
    assert optimizer.defaults["foreach"] is True  # multi-tensor kernels on CPU (fused on CUDA)
    assert all(g["lr"] == pytest.approx(cfg.optim.lr) for g in optimizer.param_groups)


def test_lr_scale_is_kept_on_each_group_and_applied_on_every_set_lr():
    cfg = load_config(None, [*TINY, "model.mup_base_d_model=16", "optim.lr=1e-2"])  # width multiplier 4
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg)
    groups = groups_by_param_name(model, optimizer)
    hidden = groups["layers.0.mlp.up_proj.weight"]
    assert hidden["lr_scale"] == pytest.approx(0.25)
    assert hidden["lr"] == pytest.approx(1e-2 * 0.25)
    set_lr(optimizer, 3e-3)
    assert hidden["lr"] == pytest.approx(3e-3 * 0.25)
    assert groups["embed_tokens.weight"]["lr"] == pytest.approx(3e-3)


def test_groups_that_leave_out_a_parameter_are_refused():
    cfg = load_config(None, TINY)
    model = StandIn()
    model.optimizer_groups = lambda wd: [{"params": [model.proj.weight], "weight_decay": wd}]
    with pytest.raises(ValueError, match="left out trainable parameters"):
        build_optimizer(model, cfg)


def test_adafactor_builds_from_the_same_groups_and_trains():
    cfg = load_config(None, [*TINY, "optim.name=adafactor", "optim.lr=1e-2"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.Adafactor)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.1}
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        loss = model(x[:, :-1], labels=x[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1

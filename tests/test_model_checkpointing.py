"""Activation checkpointing: same gradients in every mode, recomputation really happens, names unchanged."""

import copy

import pytest
import torch

from raytrainer.config import ActivationCheckpointing, ModelConfig
from raytrainer.model import Transformer
from raytrainer.model.checkpointing import apply_activation_checkpointing

MODES = [
    (ActivationCheckpointing(mode="none"), []),
    (ActivationCheckpointing(mode="full"), ["layers.0", "layers.1", "layers.2"]),
    (ActivationCheckpointing(mode="every_n", every_n=2), ["layers.0", "layers.2"]),
    (ActivationCheckpointing(mode="selective", selective="attention"),
     ["layers.0.self_attn", "layers.1.self_attn", "layers.2.self_attn"]),
    (ActivationCheckpointing(mode="selective", selective="mlp"),
     ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]),
]


def make_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=31, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=32, qk_norm=True)
    return Transformer(cfg)


def loss_and_grads(model: Transformer):
    x = torch.randint(0, 31, (2, 16), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    loss = model(x, labels=x, doc_ids=doc_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ac_cfg,expected", MODES, ids=["none", "full", "every_2", "attention", "mlp"])
def test_checkpointing_keeps_gradients_and_names(ac_cfg, expected):
    reference = make_model()
    ref_loss, ref_grads = loss_and_grads(reference)

    model = make_model()
    names_before = list(model.state_dict())
    assert apply_activation_checkpointing(model, ac_cfg) == expected
    assert list(model.state_dict()) == names_before

    # a recomputed module runs its inner projections twice: once forward, once during backward
    calls: dict[str, int] = {}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls.get(name, 0) + 1)

    for name, module in model.named_modules():
        if name.endswith(("q_proj", "gate_proj")):
            module.register_forward_hook(count(name))
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    for i in range(3):
        whole_block = f"layers.{i}" in expected
        for part, proj in (("self_attn", "q_proj"), ("mlp", "gate_proj")):
            recomputed = whole_block or f"layers.{i}.{part}" in expected
            assert calls[f"layers.{i}.{part}.{proj}"] == (2 if recomputed else 1)


def test_deepcopy_of_a_checkpointed_model_runs_its_own_weights():
    model = make_model()
    apply_activation_checkpointing(model, ActivationCheckpointing(mode="full"))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.layers.parameters():
            p.zero_()
    x = torch.randint(0, 31, (1, 8))
    assert not torch.allclose(clone(x).logits, model(x).logits)
    assert clone.layers[0].forward.__self__ is clone.layers[0]


def test_reapplying_replaces_the_previous_choice():
    model = make_model()
    apply_activation_checkpointing(model, ActivationCheckpointing(mode="full"))
    apply_activation_checkpointing(model, ActivationCheckpointing(mode="selective", selective="mlp"))
    assert all("forward" not in block.__dict__ for block in model.layers)
    assert all("forward" in block.mlp.__dict__ for block in model.layers)
    apply_activation_checkpointing(model, ActivationCheckpointing(mode="none"))
    assert not any("forward" in m.__dict__ for m in model.modules())

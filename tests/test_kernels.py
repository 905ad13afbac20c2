"""The Triton kernels against their torch references (values and gradients, fp32 and bf16), run on the CPU by
Triton's interpreter; and the model's choice between them."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: @triton.jit reads it then

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from raytrainer.kernels import enabled  # noqa: E402
from raytrainer.kernels.gating import swiglu  # noqa: E402
from raytrainer.kernels.loss import cross_entropy  # noqa: E402
from raytrainer.kernels.norm import rms_norm  # noqa: E402
from raytrainer.kernels.rotary import rope  # noqa: E402
from raytrainer.model.loss import token_loss_sums  # noqa: E402
from raytrainer.model.rope import apply_rope  # noqa: E402

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def both_ways(fn_kernel, fn_reference, *inputs, dtype):
    """Outputs and input gradients of the kernel and of the reference, from the same inputs and upstream grads."""
    results = []
    for fn in (fn_kernel, fn_reference):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = fn(*leaves)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
        out.backward(upstream)
        results.append((out.detach(), [x.grad for x in leaves if x.requires_grad]))
    (out_k, grads_k), (out_r, grads_r) = results
    torch.testing.assert_close(out_k, out_r, **TOLERANCE[dtype])
    for gk, gr in zip(grads_k, grads_r, strict=True):
        torch.testing.assert_close(gk.float(), gr.float(), **TOLERANCE[dtype])


@DTYPES
@pytest.mark.parametrize("shape", [(2, 5, 64), (3, 100)], ids=["3d", "odd-width"])
def test_rms_norm_matches_the_model(shape, dtype):
    from raytrainer.model.transformer import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    weight = norm.weight.detach()

    def reference(x, w):
        return torch.func.functional_call(norm, {"weight": w}, (x,))

    both_ways(lambda x, w: rms_norm(x, w, 1e-5), reference, x, weight, dtype=dtype)


@DTYPES
def test_swiglu_matches_silu_times_up(dtype):
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(3, 7, 50, generator=g) * 3).to(dtype), torch.randn(3, 7, 50, generator=g).to(dtype)
    both_ways(swiglu, lambda a, b: F.silu(a) * b, gate, up, dtype=dtype)


@DTYPES
def test_rope_matches_the_model(dtype):
    from raytrainer.config import ModelConfig
    from raytrainer.model.rope import RotaryEmbedding

    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, vocab_size=64)
    rotary = RotaryEmbedding(cfg)
    rotary.reset_parameters()
    positions = torch.tensor([[0, 1, 2, 3, 0, 1], [5, 6, 7, 8, 9, 10]])
    cos, sin = rotary(positions)
    x = torch.randn(2, 6, 4, cfg.head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    both_ways(lambda x: rope(x, cos, sin), lambda x: apply_rope(x, cos, sin), x, dtype=dtype)


@pytest.mark.parametrize("smoothing,z_weight", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("vocab", [50, 5000], ids=["one-block", "two-blocks"])
@DTYPES
def test_cross_entropy_matches_the_models_loss(smoothing, z_weight, vocab, dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 9, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (2, 9), generator=g)
    labels[0, :3] = -100  # ignored positions

    def kernel(x):
        objective, lse, ce = cross_entropy(x.reshape(-1, vocab), labels.reshape(-1), smoothing)
        valid = labels.reshape(-1) != -100
        z = torch.where(valid, lse.square(), torch.zeros(()))
        kernel.ce = ce.sum()
        return (objective + z_weight * z).sum()

    def reference(x):
        sums = token_loss_sums(x, labels, smoothing, z_weight)
        reference.ce = sums.ce
        return sums.objective

    both_ways(kernel, reference, logits, dtype=dtype)
    torch.testing.assert_close(kernel.ce, reference.ce, **TOLERANCE[dtype])


def test_the_model_uses_the_kernels_on_cuda_tensors_only(monkeypatch):
    cpu = torch.zeros(2)
    assert not enabled(cpu)  # a CPU run never needs Triton
    fake_cuda = torch.zeros(2, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type == "meta"))
    assert enabled(fake_cuda)
    monkeypatch.setenv("RAYTRAINER_KERNELS", "torch")
    assert not enabled(fake_cuda)


def test_a_model_step_through_every_kernel_equals_the_torch_path(monkeypatch):
    """The kernels wired into the model (forced on for CPU tensors here): the same loss and gradients."""
    import raytrainer.kernels
    from raytrainer.config import load_config
    from raytrainer.model import Transformer

    smoothing, z_weight = 0.1, 1e-3  # every term of the loss on
    cfg = load_config(None, ["model.vocab_size=96", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.multiple_of=32", "model.max_seq_len=16", "model.qk_norm=true",
                             "train.seq_len=16", "train.global_batch_tokens=64",
                             f"model.loss.label_smoothing={smoothing}", f"model.loss.z_loss_weight={z_weight}"])
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 96, (2, 17), generator=g)
    doc_ids = (torch.arange(16) >= 7).long().expand(2, 16)
    results = []
    for forced in (False, True):
        monkeypatch.setattr(raytrainer.kernels, "enabled", lambda x, forced=forced: forced)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        out = model(tokens[:, :-1], labels=tokens[:, 1:], doc_ids=doc_ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_torch, grads_torch), (loss_kernels, grads_kernels) = results
    torch.testing.assert_close(loss_kernels, loss_torch, rtol=1e-5, atol=1e-6)
    for name, grad in grads_torch.items():
        torch.testing.assert_close(grads_kernels[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

"""RoPE: the rotate_half convention, relative positions, linear and YaRN scaling."""

import math

import pytest
import torch

from raytrainer.config import ModelConfig, RopeScaling
from raytrainer.model import Transformer
from raytrainer.model.rope import RotaryEmbedding, apply_rope, rope_frequencies


def cfg(scaling: RopeScaling | None = None, **overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=64, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=64,
                rope_theta=10000.0, rope_scaling=scaling)
    return ModelConfig(**{**base, **overrides})


def test_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(cfg())
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(pq: int, pk: int) -> torch.Tensor:
        cos_q, sin_q = rope(torch.tensor([[pq]]))
        cos_k, sin_k = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cos_q, sin_q) * apply_rope(k, cos_k, sin_k)).sum()

    torch.testing.assert_close(score(7, 3), score(27, 23), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)


def test_rotate_half_convention_pairs_i_with_i_plus_half():
    # rotating position 1 by angle w_i mixes dims i and i + head_dim/2 (not 2i and 2i+1)
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0
    cos, sin = RotaryEmbedding(cfg(d_model=16, n_heads=2))(torch.tensor([[1]]))
    y = apply_rope(x, cos, sin)[0, 0, 0]
    assert y[0] == pytest.approx(math.cos(1.0)) and y[4] == pytest.approx(math.sin(1.0))
    assert torch.count_nonzero(y) == 2


def test_linear_scaling_is_position_interpolation():
    plain = RotaryEmbedding(cfg())
    linear = RotaryEmbedding(cfg(RopeScaling(kind="linear", factor=4.0)))
    positions = torch.arange(0, 16)[None]
    for a, b in zip(linear(positions * 4), plain(positions), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_yarn_keeps_high_frequencies_interpolates_low_ones_and_sets_temperature():
    factor = 8.0
    scaling = RopeScaling(kind="yarn", factor=factor, original_max_seq_len=64)
    plain, _ = rope_frequencies(32, 10000.0, None)
    yarn, mscale = rope_frequencies(32, 10000.0, scaling)
    ratio = yarn / plain
    assert ratio[0] == pytest.approx(1.0)  # fastest rotation: untouched
    assert ratio[-1] == pytest.approx(1 / factor)  # slowest: plain position interpolation
    assert torch.all(ratio[1:] <= ratio[:-1] + 1e-7)  # a monotone ramp in between
    assert ((ratio > 1 / factor + 1e-6) & (ratio < 1 - 1e-6)).any()
    assert mscale == pytest.approx(0.1 * math.log(factor) + 1)
    cos, _ = RotaryEmbedding(cfg(scaling))(torch.zeros(1, 1, dtype=torch.long))
    torch.testing.assert_close(cos, torch.full_like(cos, mscale))  # q.k scaled by mscale^2 = 1/t


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_scaling_reduces_to_plain_rope_as_factor_goes_to_one(kind):
    torch.manual_seed(0)
    plain = Transformer(cfg()).eval()
    scaled = Transformer(cfg(RopeScaling(kind=kind, factor=1.0001, original_max_seq_len=64))).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randint(0, 61, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(scaled(x).logits, plain(x).logits, rtol=1e-3, atol=1e-3)
    far = Transformer(cfg(RopeScaling(kind=kind, factor=4.0, original_max_seq_len=16))).eval()
    far.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert (far(x).logits - plain(x).logits).abs().max() > 1e-3  # a real factor changes the model


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_scaled_model_runs_past_the_original_context(kind):
    torch.manual_seed(0)
    model = Transformer(cfg(RopeScaling(kind=kind, factor=4.0, original_max_seq_len=16), max_seq_len=16))
    x = torch.randint(0, 61, (1, 64))
    out = model(x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()

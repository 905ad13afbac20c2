"""Parameter and FLOP counts against the built model, a hand computation and torch's FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from raytrainer.config import ModelConfig, load_config
from raytrainer.model import Transformer
from raytrainer.model.flops import count_params, flops_per_token, matmul_params

SMALL = dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=128)


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": True}, {"qk_norm": True, "mtp_heads": 2},
                                     {"n_kv_heads": None, "ffn_hidden": None, "multiple_of": 32}])
def test_count_params_matches_the_model(options):
    cfg = ModelConfig(**{**SMALL, **options})
    model = Transformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    vocab = {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in vocab)
    assert count_params(cfg, include_embeddings=False) == non_embedding


def test_hand_computed_counts():
    cfg = ModelConfig(**SMALL)
    # per layer: q, o 64x64; k, v 64x32; gate/up/down 64x96; two norms of 64
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64
    assert count_params(cfg) == 2 * per_layer + 64 + 2 * 100 * 64
    matmul = 2 * (per_layer - 2 * 64) + 100 * 64  # blocks + lm_head; the embedding lookup is not a matmul
    assert matmul_params(cfg) == matmul
    assert flops_per_token(cfg, 128) == 6 * matmul + 12 * 2 * 64 * 128


def test_llama_8b_preset():
    cfg = load_config("llama-8b").model
    assert count_params(cfg) == pytest.approx(8.03e9, rel=1e-3)
    assert count_params(cfg, include_embeddings=False) == pytest.approx(6.98e9, rel=1e-3)
    # 6N dominates; attention at 8k context adds 12 * 32 * 4096 * 8192
    assert flops_per_token(cfg, 8192) == pytest.approx(6 * (8.03e9 - 128256 * 4096) + 12 * 32 * 4096 * 8192,
                                                        rel=1e-3)


def test_matmul_flops_agree_with_torch_flop_counter():
    # The logits materialised: FlopCounterMode does not see the chunked loss's in-place addmm_ (test_fused_loss
    # counts that path's products, the same three per token)
    cfg = ModelConfig(**{**SMALL, "mtp_heads": 1, "loss": {"chunk_tokens": 0}})
    model = Transformer(cfg)
    x = torch.randint(0, 100, (2, 128))
    with FlopCounterMode(display=False) as counter:
        model(x, labels=x).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    mm_flops = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.bmm"))
    assert mm_flops == 6 * matmul_params(cfg) * x.numel()

"""Our weights, renamed with HF's `model.` prefix and nothing else, give the logits of transformers' Llama."""

import pytest
import torch

from data_corpus import load_script
from raytrainer.config import ModelConfig, RopeScaling
from raytrainer.model import Transformer

transformers = pytest.importorskip("transformers")  # a test dependency (pyproject [test])


def hf_rope_parameters(cfg: ModelConfig) -> dict:
    scaling = cfg.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor, "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "factor": scaling.factor, "rope_theta": cfg.rope_theta,
            "original_max_position_embeddings": scaling.original_max_seq_len,
            "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}


@pytest.mark.parametrize("scaling", [None, RopeScaling(kind="linear", factor=4.0),
                                     RopeScaling(kind="yarn", factor=4.0, original_max_seq_len=32)])
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_llama(scaling, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                      max_seq_len=128, rope_theta=5000.0, rope_scaling=scaling, tie_embeddings=tie)
    ours = Transformer(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, rms_norm_eps=cfg.norm_eps,
        rope_parameters=hf_rope_parameters(cfg), tie_word_embeddings=tie,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: HF re-ties lm_head itself
    x = torch.randint(0, 97, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,chunk_tokens", [("mha", 0), ("mha", "auto"), ("gqa", 0), ("gqa", 64)])
def test_the_peer_bench_shapes_give_hfs_loss_and_gradients_from_the_exported_weights(shape, chunk_tokens):
    """bench/peer_model.py compares tokens/s of two models that must be the same model: same weights through
    the export mapping, the same loss and gradients on the same tokens (on a shorter row than the bench's), ours
with the chunked loss too."""
    peer = load_script("bench", "peer_model")
    ours, theirs, cfg = peer.build(peer.SHAPES[shape], chunk_tokens)
    ids = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    ours_loss, theirs_loss = peer.loss_of(ours, ids, ours=True), peer.loss_of(theirs, ids, ours=False)
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-5)
    ours_loss.backward()
    theirs_loss.backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        hf_name = name if name.startswith("lm_head") else "model." + name
        torch.testing.assert_close(p.grad, theirs_grads[hf_name].grad, rtol=1e-4, atol=1e-6, msg=name)

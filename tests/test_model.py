"""The decoder: causality, document isolation, init, GQA, soft-capping, tying, names, groups, training."""

import math

import pytest
import torch

from raytrainer.config import ModelConfig
from raytrainer.model import ModelOutput, Transformer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded; extra threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides)).eval()


def packed_row() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of three documents (6, 5 and 5 tokens) with restarting position ids."""
    doc_ids = torch.tensor([[0] * 6 + [1] * 5 + [2] * 5])
    position_ids = torch.tensor([list(range(6)) + list(range(5)) + list(range(5))])
    input_ids = torch.randint(0, 61, (1, 16), generator=torch.Generator().manual_seed(1))
    return input_ids, position_ids, doc_ids


@pytest.mark.parametrize("options", [{}, {"qk_norm": True}, {"n_kv_heads": 1, "logit_softcap": 5.0}])
@pytest.mark.parametrize("with_docs", [False, True])
def test_no_future_token_leakage(options, with_docs):
    model = build(**options)
    input_ids, position_ids, doc_ids = packed_row()
    kwargs = {"position_ids": position_ids, "doc_ids": doc_ids} if with_docs else {}
    t = 8
    perturbed = input_ids.clone()
    perturbed[0, t] = (perturbed[0, t] + 1) % 61
    with torch.no_grad():
        before = model(input_ids, **kwargs).logits
        after = model(perturbed, **kwargs).logits
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t] - before[:, t]).abs().max() > 1e-4  # the perturbed token itself does matter


def test_no_cross_document_leakage():
    model = build(qk_norm=True)
    input_ids, position_ids, doc_ids = packed_row()
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, doc_ids=doc_ids).logits
        other = input_ids.clone()
        other[0, 11:] = (other[0, 11:] + 7) % 61  # rewrite document 2
        other[0, :6] = (other[0, :6] + 3) % 61  # and document 0
        changed = model(other, position_ids=position_ids, doc_ids=doc_ids).logits
        alone = model(input_ids[:, 6:11], position_ids=torch.arange(5)[None]).logits

    torch.testing.assert_close(changed[:, 6:11], packed[:, 6:11], rtol=0, atol=1e-6)  # document 1 untouched
    torch.testing.assert_close(packed[:, 6:11], alone, rtol=1e-5, atol=1e-5)  # same as running it alone
    # without document masking, document 1 does see document 0
    with torch.no_grad():
        leaky = model(other, position_ids=position_ids).logits
        clean = model(input_ids, position_ids=position_ids).logits
    assert (leaky[:, 6:11] - clean[:, 6:11]).abs().max() > 1e-4


def test_position_ids_default_to_arange():
    model = build()
    x = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        explicit = model(x, position_ids=torch.arange(12).expand(2, 12)).logits
        torch.testing.assert_close(model(x).logits, explicit)


def _std(p: torch.Tensor) -> float:
    return p.detach().float().std().item()


@pytest.mark.parametrize("depth_scaled", [True, False])
def test_init_statistics(depth_scaled):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, ffn_hidden=512,
                      init_std=0.02, depth_scaled_init=depth_scaled)
    model = Transformer(cfg)
    residual_std = 0.02 / math.sqrt(2 * 4) if depth_scaled else 0.02
    assert _std(model.embed_tokens.weight) == pytest.approx(0.02, rel=0.03)
    assert _std(model.lm_head.weight) == pytest.approx(0.02, rel=0.03)
    for layer in model.layers:
        for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.mlp.up_proj.weight,
                  layer.mlp.gate_proj.weight):
            assert _std(w) == pytest.approx(0.02, rel=0.05)
            assert w.mean().abs().item() < 0.002
        for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            assert _std(w) == pytest.approx(residual_std, rel=0.05)
        assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_init_weights_reinitialises_everything_and_works_from_meta():
    cfg = tiny(qk_norm=True, mtp_heads=1)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    model.rotary_emb.inv_freq.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.std() > 0, name
    torch.testing.assert_close(model.rotary_emb.inv_freq, build().rotary_emb.inv_freq)
    fresh = Transformer(cfg)
    torch.manual_seed(0)
    fresh.init_weights()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # same seed, same init: init_weights is the whole init


def test_gqa_shapes_and_equivalence_to_repeated_kv_heads():
    gqa = build(n_heads=4, n_kv_heads=2)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)
    assert gqa.layers[0].self_attn.q_proj.weight.shape == (4 * 8, 32)
    mha = build(n_heads=4, n_kv_heads=None)
    state = gqa.state_dict()
    for key, w in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            # kv head j serves query heads 2j and 2j+1 (repeat_interleave, like HF's repeat_kv)
            state[key] = w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(mha(x).logits, gqa(x).logits, rtol=1e-5, atol=1e-5)
    mqa = build(n_kv_heads=1)
    assert mqa(x).logits.shape == (2, 10, 61)


def test_logit_softcap_bounds_and_formula():
    capped = build(logit_softcap=2.0, init_std=1.0)
    raw = build(init_std=1.0)
    raw.load_state_dict(capped.state_dict())
    x = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        c, r = capped(x).logits, raw(x).logits
    assert r.abs().max() > 4.0  # the cap is actually exercised
    assert c.abs().max() <= 2.0
    torch.testing.assert_close(c, 2.0 * torch.tanh(r / 2.0))


def test_weight_tying_shares_storage():
    model = build(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "embed_tokens.weight" in names
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randint(0, 61, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)


def test_parameter_names_match_hf_llama():
    model = build(n_layers=2)
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"}
    assert set(model.state_dict()) == expected
    with_qk = build(n_layers=2, qk_norm=True)
    extra = set(with_qk.state_dict()) - expected
    assert extra == {f"layers.{i}.self_attn.{n}_norm.weight" for i in range(2) for n in "qk"}  # Qwen3 names


def test_forward_output_and_metrics():
    model = build()
    x = torch.randint(0, 61, (2, 12))
    labels = x.clone()
    labels[:, -3:] = -100
    out = model(x, labels=labels)
    assert isinstance(out, ModelOutput) and out.logits is None  # by default the loss never materialises them
    assert out.metrics["label_tokens"].item() == 18
    assert out.metrics["ce"].requires_grad is False
    assert out.loss.item() == pytest.approx(out.metrics["ce"].item(), rel=1e-5)  # no smoothing/z-loss
    generating = model(x)
    assert generating.loss is None and generating.logits.shape == (2, 12, 61)


def test_optimizer_groups_cover_each_parameter_once():
    for options in ({}, {"tie_embeddings": True, "qk_norm": True, "mtp_heads": 1}):
        model = build(**options)
        groups = model.optimizer_groups(weight_decay=0.1)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())
        by_name = {g["name"]: g for g in groups}
        assert by_name["hidden"]["weight_decay"] == 0.1
        assert by_name["embeddings"]["weight_decay"] == 0.0 and by_name["norms"]["weight_decay"] == 0.0
        assert all(g["lr_scale"] == 1.0 for g in groups)
        assert all(p.ndim == 1 for p in by_name["norms"]["params"])
        assert ("output" in by_name) == (not options.get("tie_embeddings", False))

    mup = build(d_model=128, mup_base_d_model=32)
    scales = {g["name"]: g["lr_scale"] for g in mup.optimizer_groups(0.1)}
    assert scales == {"hidden": 0.25, "output": 1.0, "embeddings": 1.0, "norms": 1.0}


def test_mup_init_and_attention_scale():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=256, n_layers=2, n_heads=4, ffn_hidden=512, mup_base_d_model=64,
                      depth_scaled_init=False)
    model = Transformer(cfg)
    assert _std(model.layers[0].mlp.up_proj.weight) == pytest.approx(0.02 / 2, rel=0.05)  # m = 4
    assert _std(model.embed_tokens.weight) == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].self_attn.scale == pytest.approx(1 / 64)
    assert build().layers[0].self_attn.scale == pytest.approx(1 / math.sqrt(8))


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=32, d_model=64, n_heads=4, ffn_hidden=128, qk_norm=True))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (4, 24), generator=gen)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(x, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0  # about ln(32) at init
    assert loss.item() < 0.3

"""A run starts from Hugging Face weights on disk (model.init_from: hf:<dir>): Llama and Qwen3 checkpoints
saved by `transformers` itself from random initialisation (nothing from a hub) give our model their logits;
a config or tensor that does not fit is refused naming the key and both values; a resumed run loads its own
checkpoint instead."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from raytrainer.config import ConfigError, load_config
from raytrainer.fault.guardian import Guardian
from raytrainer.hf.weights import ImportRefused, load_hf_weights
from raytrainer.model import Transformer
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import MICRO_MODEL, make_dataset, micro_config

transformers = pytest.importorskip("transformers")


def model_config(qk_norm: bool, extra: list[str] = ()):
    return load_config("tiny", [*MICRO_MODEL, f"model.qk_norm={str(qk_norm).lower()}", *extra]).model


def save_hf(tmp_path, qk_norm: bool, **changes):
    """A randomly initialised HF model of the micro shape, saved by transformers; returns (dir, model)."""
    cfg = model_config(qk_norm)
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  tie_word_embeddings=cfg.tie_embeddings)
    fields.update(changes)
    torch.manual_seed(1)
    if qk_norm:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    out = tmp_path / "hf"
    hf.save_pretrained(out)
    return out, hf.eval()


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_imported_weights_give_the_hf_models_logits(tmp_path, qk_norm):
    directory, hf = save_hf(tmp_path, qk_norm)
    cfg = model_config(qk_norm)
    ours = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        before = ours(x).logits
        load_hf_weights(ours, cfg, f"hf:{directory}")
        torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, ours(x).logits)


def test_a_config_that_describes_another_model_is_refused_naming_both_values(tmp_path):
    directory, _ = save_hf(tmp_path, qk_norm=False, num_key_value_heads=4)
    with pytest.raises(ImportRefused, match=r"num_key_value_heads=4 \(ours: model.n_kv_heads=2\)"):
        load_hf_weights(Transformer(model_config(False)), model_config(False), f"hf:{directory}")
    with pytest.raises(ImportRefused, match="is llama but model.qk_norm=True.*set model.qk_norm=false"):
        load_hf_weights(Transformer(model_config(True)), model_config(True), f"hf:{directory}")


def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    directory, _ = save_hf(tmp_path, qk_norm=False)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = model_config(False)
    with pytest.raises(ImportRefused) as err:
        load_hf_weights(Transformer(cfg), cfg, f"hf:{directory}")
    assert "missing model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.norm.weight [3] (expected [64])" in str(err.value)


def test_init_from_must_name_an_hf_directory():
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config("tiny", ["model.init_from=/models/llama"])


def test_a_fresh_run_starts_from_the_imported_weights_and_a_resumed_one_from_its_checkpoint(tmp_path):
    directory, hf = save_hf(tmp_path, qk_norm=True)  # the tiny preset's qk_norm=true: a Qwen3 checkpoint
    dataset = make_dataset(tmp_path)
    cfg = micro_config(dataset, str(tmp_path / "runs"), name="warm", steps=5,
                       extra=[f"model.init_from=hf:{directory}"])
    torch.set_num_threads(1)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    module = trainer.engine.strategy.module
    assert torch.equal(module.embed_tokens.weight, hf.model.embed_tokens.weight)
    trainer.fit()
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    assert not torch.equal(trained["embed_tokens.weight"], hf.model.embed_tokens.weight)
    resumed = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    resumed.restore()
    for name, tensor in resumed.engine.strategy.module.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_import_then_export_is_the_identity(tmp_path, qk_norm):
    from raytrainer.export import write_safetensors
    from raytrainer.hf.architecture import hf_state_dict

    directory, _ = save_hf(tmp_path, qk_norm)
    cfg = model_config(qk_norm)
    model = Transformer(cfg)
    load_hf_weights(model, cfg, f"hf:{directory}")
    out = tmp_path / "again"
    out.mkdir()
    write_safetensors(hf_state_dict(model.state_dict(), cfg.tie_embeddings), out, 1 << 30)
    original, again = load_file(str(directory / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name

"""Starting a run from Hugging Face weights on disk (`model.init_from: hf:<dir>`): Llama or Qwen3
safetensors, weights only. The directory's config.json must describe the configured model (the fields that
decide what it computes are compared one by one) and every tensor must be there in the configured shape;
anything else is an error that names the file, the key and both values.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raytrainer.config import ConfigError, ModelConfig
from raytrainer.hf.architecture import exported_names, hf_architecture, lossy_features
from raytrainer.warm_start import state_mismatches

HF_PREFIX = "hf:"


class ImportRefused(ConfigError):
    """The HF checkpoint is not the configured model; the message names what differs."""


def hf_dir(init_from: str) -> Path:
    if not init_from.startswith(HF_PREFIX):
        raise ImportRefused(f"model.init_from={init_from!r}: expected hf:<directory with config.json and "
                            "safetensors>, e.g. hf:/models/llama-3.2-1b")
    return Path(init_from[len(HF_PREFIX):]).expanduser()


# (config.json key, our value) pairs that decide what the model computes.
def _expected_config(cfg: ModelConfig) -> dict:
    return {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}


_OUR_NAMES = {"hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers",
              "num_attention_heads": "model.n_heads", "num_key_value_heads": "model.n_kv_heads",
              "head_dim": "model.d_model / model.n_heads", "intermediate_size": "model.ffn_hidden",
              "vocab_size": "model.vocab_size", "rms_norm_eps": "model.norm_eps", "rope_theta": "model.rope_theta"}


def check_hf_config(cfg: ModelConfig, directory: Path) -> dict:
    """The directory's config.json, checked against the configured model."""
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImportRefused(f"model.init_from: {path} does not exist (an HF model directory has config.json "
                            "and safetensors)") from None
    except ValueError as e:
        raise ImportRefused(f"model.init_from: {path} is not JSON ({e})") from None
    _, model_type = hf_architecture(cfg)
    if hf.get("model_type") not in ("llama", "qwen3"):
        raise ImportRefused(f"model.init_from: {path} has model_type={hf.get('model_type')!r}; raytrainer imports "
                            "llama and qwen3")
    if hf["model_type"] != model_type:
        raise ImportRefused(f"model.init_from: {path} is {hf['model_type']} but model.qk_norm={cfg.qk_norm} makes "
                            f"a {model_type} model; set model.qk_norm={str(hf['model_type'] == 'qwen3').lower()}")
    if cfg.moe is not None:
        raise ImportRefused(f"model.init_from: {path} is a dense {hf['model_type']} model, but model.moe makes a "
                            "mixture of experts; remove model.moe to start from it")
    if lossy_features(cfg):
        raise ImportRefused(f"model.init_from: {path} is a plain {hf['model_type']} model, but "
                            f"{'; '.join(lossy_features(cfg))} would make it compute something else")
    rope = hf.get("rope_parameters") or {}
    hf.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    hf.setdefault("head_dim", hf.get("hidden_size", 0) // max(1, hf.get("num_attention_heads", 1)))
    hf.setdefault("num_key_value_heads", hf.get("num_attention_heads"))
    wrong = [f"{key}={hf.get(key)!r} (ours: {_OUR_NAMES[key]}={ours!r})"
             for key, ours in _expected_config(cfg).items()
             if not isinstance(hf.get(key), int | float) or not _same(hf[key], ours)]
    if bool(hf.get("tie_word_embeddings", False)) != cfg.tie_embeddings:
        wrong.append(f"tie_word_embeddings={hf.get('tie_word_embeddings')} (ours: model.tie_embeddings="
                     f"{cfg.tie_embeddings})")
    scaling = rope.get("rope_type", "default") if rope else (hf.get("rope_scaling") or {}).get("rope_type", "default")
    ours_scaling = cfg.rope_scaling.kind if cfg.rope_scaling is not None else "default"
    if scaling != ours_scaling:
        wrong.append(f"rope_type={scaling!r} (ours: model.rope_scaling={ours_scaling!r})")
    if wrong:
        raise ImportRefused(f"model.init_from: {path} describes another model: {'; '.join(wrong)}")
    return hf


def _same(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ImportRefused(f"model.init_from: {directory} has neither model.safetensors nor "
                            "model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(directory / file)))
    return tensors


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, cfg: ModelConfig, init_from: str) -> None:
    """Copy an HF checkpoint's weights into `model` (a raytrainer Transformer of `cfg`), after checking both
    config and tensors; MTP heads, which HF checkpoints do not have, keep their initialisation."""
    directory = hf_dir(init_from)
    check_hf_config(cfg, directory)
    theirs = read_safetensors(directory)
    ours = model.state_dict()
    names = exported_names(list(ours), cfg.tie_embeddings)  # HF name -> ours
    problems = state_mismatches({h: ours[n].shape for h, n in names.items()},
                                {k: v.shape for k, v in theirs.items() if not k.endswith("rotary_emb.inv_freq")})
    if problems:
        raise ImportRefused(f"model.init_from: the tensors in {directory} do not fit the configured model: "
                            f"{' | '.join(problems)}")
    for name, ours_name in names.items():
        ours[ours_name].copy_(theirs[name].to(ours[ours_name].dtype))

"""Which Hugging Face architecture computes the same function as a raytrainer model, and its config.json.

Our parameter names are HF's without the `model.` prefix, and RoPE uses the same rotate_half convention, so
an export is a rename plus a config:
- a plain model is `LlamaForCausalLM`;
- per-head QK-norm (an RMSNorm over head_dim on q and k, before RoPE) is exactly Qwen3's q_norm/k_norm, so a
  model with it is `Qwen3ForCausalLM`.
Features that neither has (bidirectional attention, tanh soft-capping of the logits, muP's attention scale
and multipliers) change the function: exporting them is refused unless the caller accepts a different
model. Multi-token prediction heads are extra outputs beside an unchanged next-token model, and are left
out.
"""

from __future__ import annotations

import torch

from raytrainer.config import ConfigError, ModelConfig


class ExportRefused(ConfigError):
    """The export would not be the trained model, or would overwrite something; the message says which."""


def lossy_features(cfg: ModelConfig) -> list[str]:
    """Why an export of this model would compute something else, one reason per feature ([] when exact)."""
    reasons = []
    if cfg.bidirectional:
        reasons.append("model.bidirectional=true (each token sees its whole document; HF causal LMs see only "
                       "the tokens before it)")
    if cfg.logit_softcap is not None:
        reasons.append(f"model.logit_softcap={cfg.logit_softcap:g} (tanh soft-capping of the logits)")
    if cfg.mup_base_d_model is not None:
        reasons.append(f"model.mup_base_d_model={cfg.mup_base_d_model} (muP: 1/head_dim attention scale and "
                       "width multipliers)")
    return reasons


def hf_architecture(cfg: ModelConfig) -> tuple[str, str]:
    """(architecture class name, model_type) of the HF model with the same parameters and function."""
    return ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else ("LlamaForCausalLM", "llama")


def hf_config(cfg: ModelConfig, dtype: str = "float32", special_ids: dict[str, int] | None = None) -> dict:
    """config.json for the model; `special_ids` (role -> id, from the tokenizer) adds eos and pad."""
    architecture, model_type = hf_architecture(cfg)
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.kind, "factor": s.factor, "rope_theta": cfg.rope_theta}
        if s.kind == "yarn":
            rope.update(original_max_position_embeddings=s.original_max_seq_len,
                        beta_fast=s.beta_fast, beta_slow=s.beta_slow)
    out = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "dtype": dtype,
    }
    if model_type == "llama":
        out["mlp_bias"] = False
    else:  # every layer attends to the whole sequence, as ours do
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                   layer_types=["full_attention"] * cfg.n_layers)
    if special_ids:
        out.update(eos_token_id=special_ids["eos"], pad_token_id=special_ids["pad"], bos_token_id=None)
    return out


def hf_name(name: str) -> str:
    """Our parameter name as HF spells it: the trunk under `model.`, the output head as it is."""
    return name if name.startswith("lm_head") else f"model.{name}"


def exported_names(names: list[str], tie_embeddings: bool) -> dict[str, str]:
    """HF name -> ours, for the parameters an export writes: MTP heads and a tied lm_head left out."""
    return {hf_name(n): n for n in names
            if not n.startswith("mtp.") and not (tie_embeddings and n == "lm_head.weight")}


def hf_state_dict(state: dict[str, torch.Tensor], tie_embeddings: bool,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our state dict under HF names, in `dtype`; MTP heads and a tied lm_head left out."""
    return {theirs: state[ours].detach().to(dtype).contiguous().clone()
            for theirs, ours in exported_names(list(state), tie_embeddings).items()}

"""Checkpoints out of the trainer: Hugging Face Llama format, and sampling for a quick look.

Our parameter names are HF Llama's without the `model.` prefix and RoPE uses the same rotate_half
convention, so the export is a rename plus config.json; the multi-token-prediction heads have no HF
counterpart and are dropped.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from raytrainer.config import Config, ModelConfig

log = logging.getLogger("raytrainer.export")


def hf_config(cfg: ModelConfig) -> dict:
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.kind, "factor": s.factor, "rope_theta": cfg.rope_theta}
        if s.kind == "yarn":
            rope.update(original_max_position_embeddings=s.original_max_seq_len,
                        beta_fast=s.beta_fast, beta_slow=s.beta_slow)
    unsupported = [name for name, on in (("qk_norm", cfg.qk_norm), ("logit_softcap", cfg.logit_softcap),
                                          ("mup_base_d_model", cfg.mup_base_d_model)) if on]
    if unsupported:
        log.warning("HF Llama has no %s: the exported model will not reproduce these features", unsupported)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def hf_state_dict(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.startswith("mtp.") or (tie_embeddings and name == "lm_head.weight"):
            continue
        out[name if name.startswith("lm_head") else f"model.{name}"] = tensor.detach().contiguous().clone()
    return out


def write_hf(model_cfg: ModelConfig, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(state, model_cfg.tie_embeddings), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model_cfg), indent=2))
    return out


def load_model(cfg: Config, run_url: str, step: int | None = None, use_ema: bool = False):
    """A single-process Transformer with the weights of a checkpoint (any strategy, any world size)."""
    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.checkpoint.manager import MODEL_DIR
    from raytrainer.model import Transformer
    from raytrainer.report import split_run_url
    from raytrainer.train.strategies import load_full_state_dict

    storage, name = split_run_url(run_url)
    store = CheckpointStore(storage, name, cfg.checkpoint.s3)
    step = store.latest_complete() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {run_url}")
    model = Transformer(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = store.download(step, tmp)
        state = load_full_state_dict(cfg, model, Path(loaded.local_dir) / MODEL_DIR, use_ema=use_ema)
    model.load_state_dict(state)
    log.info("loaded %s step %d%s", run_url, step, " (EMA weights)" if use_ema else "")
    return model.eval()


def export_hf(cfg: Config, run_url: str, out_dir: str, step: int | None = None, use_ema: bool = False) -> Path:
    model = load_model(cfg, run_url, step, use_ema)
    out = write_hf(cfg.model, model.state_dict(), out_dir)
    tokenizer_json = Path(cfg.data.tokenizer)
    if tokenizer_json.suffix == ".json" and tokenizer_json.exists():
        shutil.copy(tokenizer_json, out / "tokenizer.json")
    return out


@torch.no_grad()
def generate(cfg: Config, run_url: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             step: int | None = None, seed: int = 0) -> str:
    from raytrainer.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = load_model(cfg, run_url, step)
    torch.manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -cfg.model.max_seq_len:]).logits[:, -1, :]
        if temperature <= 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            next_id = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
        ids = torch.cat([ids, next_id], dim=1)
        if next_id.item() == tokenizer.eos_id:
            break
    return tokenizer.decode(ids[0].tolist())

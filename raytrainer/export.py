"""Checkpoints out of the trainer: the same model in Hugging Face format, and sampling for a quick look.

A checkpoint holds the config it was trained with (trainer_state.json), so neither needs `--config`; one
given replaces it, and `--set` overrides apply on top of either. Which HF architecture, and what an export
refuses to write: raytrainer.hf.architecture.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from raytrainer.config import Config, S3Config, config_from_dict, load_config
from raytrainer.hf.architecture import ExportRefused, hf_architecture, hf_config, hf_state_dict, lossy_features
from raytrainer.sampling import Sampling

log = logging.getLogger("raytrainer.export")

DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
DEFAULT_SHARD_BYTES = 5 * 1024**3


def storage_access(overrides: list[str]) -> S3Config:
    """The S3 settings to reach a run's checkpoints, from `--set checkpoint.s3.*=...` (and the environment)."""
    own = [o for o in overrides if o.split("=", 1)[0].strip().startswith("checkpoint.s3.")]
    return load_config(None, own).checkpoint.s3


def run_config(run_url: str, step: int | None = None, preset: str | None = None, overrides: list[str] = (),
               s3: S3Config | None = None) -> tuple[Config, int]:
    """(config, step) for a run's checkpoint (the newest complete one unless `step`): the config the checkpoint
    was trained with, or `preset` when given, with `overrides` on top."""
    from raytrainer.checkpoint.manager import STATE_FILE
    from raytrainer.report import pick_checkpoint

    store, step = pick_checkpoint(run_url, step, s3)
    if preset is not None:
        return load_config(preset, list(overrides)), step
    stored = store.read_json(step, STATE_FILE).get("config")
    if not stored:
        raise ExportRefused(f"{store.step_url(step)}/{STATE_FILE} holds no config (written by an older version); "
                            "give the run's config with --config (and its --set overrides)")
    return config_from_dict(stored, list(overrides), f"{store.step_url(step)}/{STATE_FILE}"), step


def load_model(cfg: Config, run_url: str, step: int | None = None, use_ema: bool = False,
               s3: S3Config | None = None):
    """A single-process Transformer with the weights of a checkpoint (any strategy, any world size)."""
    from raytrainer.checkpoint.manager import MODEL_DIR
    from raytrainer.model import Transformer
    from raytrainer.report import pick_checkpoint
    from raytrainer.train.strategies import load_full_state_dict

    store, step = pick_checkpoint(run_url, step, s3 if s3 is not None else cfg.checkpoint.s3)
    model = Transformer(cfg.model)
    if cfg.model.lora is not None:  # the checkpoint holds the adapters beside the frozen weights
        from raytrainer.model.lora import apply_lora

        apply_lora(model, cfg.model.lora)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = store.download(step, tmp)
        state = load_full_state_dict(cfg, model, Path(loaded.local_dir) / MODEL_DIR, use_ema=use_ema)
    model.load_state_dict(state)
    log.info("loaded %s step %d%s", run_url, step, " (EMA weights)" if use_ema else "")
    return model.eval()


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards of at most `max_shard_bytes` (a bigger
    tensor gets a shard of its own) with the index HF loads them by."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, file in zip(shards, names, strict=True):
        save_file(shard, str(out / file), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {name: file for shard, file in zip(shards, names, strict=True) for name in shard}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [*names, "model.safetensors.index.json"]


def export_hf(cfg: Config, run_url: str, out_dir: str, step: int | None = None, use_ema: bool = False, *,
              s3: S3Config | None = None, dtype: str = "fp32", lossy: bool = False, force: bool = False,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the checkpoint as an HF model directory that `from_pretrained` loads as the same model: weights,
    config.json, generation_config.json and the tokenizer files. Written aside and moved into place, so a
    failed export leaves `out_dir` as it was; an existing non-empty `out_dir` is replaced only with `force`."""
    from raytrainer.data.tokenizers import load_tokenizer
    from raytrainer.hf.tokenizer_files import write_tokenizer

    if dtype not in DTYPES:
        raise ExportRefused(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    if cfg.model.moe is not None:  # no HF Llama or Qwen3 has experts: there is no layout to write them in
        raise ExportRefused(f"model.moe (a mixture of {cfg.model.moe.n_experts} experts) has no Hugging Face "
                            "export yet: only dense Llama and Qwen3 models are written; use `raytrainer generate` "
                            "on the checkpoint itself")
    reasons = lossy_features(cfg.model)
    if reasons and not lossy:
        raise ExportRefused(f"no Hugging Face architecture computes what this model does: {'; '.join(reasons)}. "
                            "Exported anyway, it would be a different model; pass --lossy to export it regardless")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportRefused(f"{out} exists and is not empty; choose another --out, or pass --force to replace it")
    model = load_model(cfg, run_url, step, use_ema, s3=s3)
    if cfg.model.lora is not None:
        from raytrainer.model.lora import merge_lora

        merge_lora(model)  # the adapters folded into the weights: the adapted model under the base names
    torch_dtype, dtype_name = DTYPES[dtype]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    specials = {role.removesuffix("_id"): token_id for role, token_id in tokenizer.special_ids().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    aside = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    aside.mkdir()
    try:
        written = write_safetensors(hf_state_dict(model.state_dict(), cfg.model.tie_embeddings, torch_dtype),
                                    aside, max_shard_bytes)
        (aside / "config.json").write_text(json.dumps(hf_config(cfg.model, dtype_name, specials), indent=2))
        generation = {"eos_token_id": specials["eos"], "pad_token_id": specials["pad"],
                      "max_length": cfg.model.max_seq_len, "do_sample": True, "temperature": 0.8}
        (aside / "generation_config.json").write_text(json.dumps(generation, indent=2))
        tokenizer_files = write_tokenizer(tokenizer, aside, cfg.model.max_seq_len)
        if not tokenizer_files:
            log.warning("export: the %s tokenizer has no Hugging Face form; %s has the model but no tokenizer "
                        "files", cfg.data.tokenizer, out)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(aside, out)
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)
        raise
    if reasons:
        log.warning("export: %s is NOT the trained model (--lossy): %s", out, "; ".join(reasons))
    log.info("exported %s as %s (%s) to %s: %s", run_url, hf_architecture(cfg.model)[0], dtype, out,
             ", ".join([*written, "config.json", "generation_config.json", *tokenizer_files]))
    return out


def generate(cfg: Config, run_url: str, prompts: list[str], sampling: Sampling | None = None,
             step: int | None = None, s3: S3Config | None = None, use_ema: bool = False) -> list[str]:
    """Each prompt followed by what the checkpoint's model writes after it (raytrainer.sampling)."""
    from raytrainer.data.tokenizers import load_tokenizer
    from raytrainer.sampling import sample

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = load_model(cfg, run_url, step, use_ema, s3=s3)
    encoded = [tokenizer.encode(p) for p in prompts]
    new = sample(model, encoded, sampling or Sampling(), tokenizer.eos_id, tokenizer.pad_id)
    return [tokenizer.decode(prompt + tokens) for prompt, tokens in zip(encoded, new, strict=True)]

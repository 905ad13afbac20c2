"""Where a fresh run's weights come from when not from initialisation (`model.init_from`), and LoRA on top.

    hf:<dir>                                Llama / Qwen3 safetensors on disk (raytrainer.hf.weights)
    run:<checkpoint.storage>/<run>[@step]   another run's checkpoint (newest complete one unless @step):
                                            continual pretraining, SFT from a pretrained run, or branching a
                                            WSD stable-phase checkpoint into its decay
Weights only: the optimizer, schedule, data position and guardian start fresh. A run that has a checkpoint of
its own resumes from it instead (raytrainer.train.ray_entry decides).
"""

from __future__ import annotations

import logging

import torch

from raytrainer.config import Config, ConfigError

log = logging.getLogger("raytrainer.train")

RUN_PREFIX = "run:"


class WarmStartRefused(ConfigError):
    """The weights named by model.init_from do not fit the configured model; the message says what differs."""


def split_source(init_from: str) -> tuple[str, int | None]:
    """run:<url>[@step] -> (url, step or None)."""
    url = init_from[len(RUN_PREFIX):]
    if "@" in url.rsplit("/", 1)[-1]:
        url, step = url.rsplit("@", 1)
        try:
            return url, int(step)
        except ValueError:
            raise WarmStartRefused(f"model.init_from={init_from!r}: '@{step}' is not a step number") from None
    return url, None


def state_mismatches(expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> list[str]:
    """What keeps `found` tensors from filling a model that expects `expected` (name -> shape): missing,
    unexpected and misshapen names, a few of each ([] when they fit)."""
    def few(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k} {list(found[k])} (expected {list(expected[k])})" for k in sorted(set(expected) & set(found))
              if found[k] != expected[k]]
    problems = [f"missing {few(missing)}"] if missing else []
    problems += [f"unexpected {few(unexpected)}"] if unexpected else []
    problems += [f"wrong shape: {'; '.join(shapes[:5])}"] if shapes else []
    return problems


@torch.no_grad()
def load_run_weights(model: torch.nn.Module, cfg: Config, init_from: str) -> int:
    """Copy another run's checkpointed weights into `model`; returns the step they are from."""
    from raytrainer.export import load_model, run_config

    url, step = split_source(init_from)
    source_cfg, step = run_config(url, step, s3=cfg.checkpoint.s3)
    source = load_model(source_cfg, url, step, s3=cfg.checkpoint.s3).state_dict()
    ours = model.state_dict()
    problems = state_mismatches({k: v.shape for k, v in ours.items()}, {k: v.shape for k, v in source.items()})
    if problems:
        raise WarmStartRefused(f"model.init_from={init_from}: step {step} does not fit the configured model: "
                               f"{' | '.join(problems)} (the source run has model.d_model={source_cfg.model.d_model}, "
                               f"n_layers={source_cfg.model.n_layers}, vocab_size={source_cfg.model.vocab_size})")
    for name, tensor in source.items():
        ours[name].copy_(tensor)
    return step


def warm_start(cfg: Config, model: torch.nn.Module, rank: int) -> None:
    """Load model.init_from's weights into a freshly built model (before LoRA and sharding)."""
    from raytrainer.hf.weights import HF_PREFIX, load_hf_weights

    init_from = cfg.model.init_from
    if init_from.startswith(HF_PREFIX):
        load_hf_weights(model, cfg.model, init_from)
        where = init_from
    else:
        where = f"{init_from} (step {load_run_weights(model, cfg, init_from)})"
    if rank == 0:
        log.info("starting from the weights of %s (model.init_from; optimizer, schedule and data start fresh)",
                 where)


def add_adapters(cfg: Config, model: torch.nn.Module, rank: int) -> None:
    from raytrainer.model.lora import apply_lora

    trainable, total = apply_lora(model, cfg.model.lora)
    if rank == 0:
        log.info("LoRA rank %d on %s: %s trainable parameters of %s (%.2f%%); the rest is frozen",
                 cfg.model.lora.rank, ", ".join(cfg.model.lora.targets), f"{trainable:,}", f"{total:,}",
                 100 * trainable / total)

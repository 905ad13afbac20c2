"""Where a fresh run starts when not from initialisation (`model.init_from`), and LoRA on top.

    hf:<dir>                                Llama / Qwen3 safetensors on disk (raytrainer.hf.weights)
    run:<checkpoint.storage>/<run>[@step]   another run's checkpoint (newest complete one unless @step):
                                            continual pretraining, SFT from a pretrained run, or branching a
                                            WSD stable-phase checkpoint into its decay

model.init_state=weights (the default): the weights only; optimizer, schedule, data position and guardian start
fresh. model.init_state=full (run: only): the whole checkpoint is loaded as this run's starting point, through
the same path as a resume (raytrainer.train.loop.Trainer.restore): model, optimizer and step, so the schedule
goes on from there under this run's settings (a lower LR, a WSD decay starting at that step); the data
position is kept when the data section is the source's, and otherwise the new data starts at its beginning.
The guardian starts fresh. A run that has a checkpoint of its own resumes from it instead.
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


def branch_point(cfg: Config):
    """(the source run's CheckpointStore, the step to branch from, the source's config) for
    model.init_state=full, after checking that the source's model has this run's tensors and that there are
    steps left to train."""
    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.export import run_config
    from raytrainer.model import Transformer
    from raytrainer.report import split_run_url

    url, step = split_source(cfg.model.init_from)
    store = CheckpointStore(*split_run_url(url), cfg.checkpoint.s3)
    complete = store.steps()
    if step not in complete if step is not None else not complete:
        raise WarmStartRefused(f"model.init_from={cfg.model.init_from}: "
                               f"{'no' if step is None else f'step {step} is not a'} complete checkpoint at {url} "
                               f"(complete: {complete[-5:]})")
    source_cfg, step = run_config(url, step, s3=cfg.checkpoint.s3)
    if step >= cfg.train.steps:
        raise WarmStartRefused(f"model.init_from={cfg.model.init_from} (model.init_state=full) goes on from step "
                               f"{step}, but train.steps={cfg.train.steps}: nothing is left to train; raise "
                               f"train.steps (for a WSD decay: schedule.decay_start={step} and train.steps = "
                               f"{step} + schedule.decay_steps)")
    with torch.device("meta"):
        ours, theirs = Transformer(cfg.model).state_dict(), Transformer(source_cfg.model).state_dict()
    problems = state_mismatches({k: v.shape for k, v in ours.items()}, {k: v.shape for k, v in theirs.items()})
    if problems:
        raise WarmStartRefused(f"model.init_from={cfg.model.init_from}: step {step} does not fit the configured "
                               f"model: {' | '.join(problems)}")
    return store, step, source_cfg


# data keys that change how batches are read or reported, not which documents they hold
HOW_DATA_IS_READ = {"s3", "prefetch_batches", "read_tasks", "epoch_warning", "val_path"}


def same_data(source_cfg: Config, cfg: Config) -> bool:
    """Whether a branch trains on the source's data as it was (its data position then means the same thing)."""
    def data(c: Config) -> dict:  # what decides which documents come when, not how fast they are read
        return {k: v for k, v in c.data.model_dump(mode="json").items() if k not in HOW_DATA_IS_READ}

    def plan(c: Config) -> tuple:  # what else the global batch sequence is a function of
        return c.train.seed, c.train.global_batch_tokens, c.train.seq_len

    return data(source_cfg) == data(cfg) and plan(source_cfg) == plan(cfg)


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

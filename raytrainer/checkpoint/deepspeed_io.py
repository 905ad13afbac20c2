"""DeepSpeed checkpoint files: save, load (directly, or through a universal checkpoint at another world size),
which files a rank reads, and the whole model in one process.

    <directory>/zero/                       DeepSpeed's files for tag "zero" (engine.save_checkpoint)
        mp_rank_00_model_states.pt          ZeRO-1/2: the model, written by rank 0
        zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: rank r's model partition
        [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's optimizer partition
    <directory>/extra.safetensors           what the step engine adds (the EMA), written by rank 0

Saves carry the universal-checkpoint info that DeepSpeed needs to convert stage 1/2 checkpoints. At the
same world size `engine.load_checkpoint` reads a rank's own partition files and the model states; at
another, every rank converts its local copy with `ds_to_universal` and loads it with `load_universal`.
DeepSpeed writes its files with torch.save and reads them with `weights_only=False`; here every read runs
with weights-only unpickling forced on, allowing only the few DeepSpeed classes its files contain.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shutil
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("raytrainer.checkpoint")

TAG = "zero"  # one checkpoint per directory: its files live under <directory>/zero/
EXTRA_FILE = "extra.safetensors"  # what the engine saves alongside the model (the EMA), written by rank 0
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
_RANK_FILE = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_")  # a file of one data-parallel rank


def save(engine: Any, directory: str | Path, rank: int, extra: dict | None = None) -> None:
    """engine.save_checkpoint into `directory` (every rank calls it), and `extra` from rank 0."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=TAG, client_state=UNIVERSAL_INFO)
    if extra and rank == 0:
        save_file(_flatten(extra), str(directory / EXTRA_FILE))


def files_for_rank(names: Collection[str], rank: int, saved_world_size: int, world_size: int) -> set[str]:
    """The files of a checkpoint (names relative to its directory) that `load` reads on `rank`: at the same
    world size everything but the other ranks' partitions. At another world size every file: ds_to_universal
    merges all ranks' partitions into whole parameters before any rank can cut its new partition out."""
    if saved_world_size != world_size:
        return set(names)
    return {n for n in names if (m := _RANK_FILE.search(n)) is None or int(m.group(1)) == rank}


def load(engine: Any, directory: str | Path, saved_world_size: int, world_size: int, rank: int,
         extra: dict | None = None) -> None:
    """Load what `save` wrote into the DeepSpeed engine, at any world size; `extra`'s entries are replaced
    by the saved ones."""
    directory = Path(directory)
    if not (directory / TAG).is_dir():
        raise FileNotFoundError(f"{directory / TAG}: no DeepSpeed checkpoint here (expected the files "
                                "DeepSpeedStrategy.save writes)")
    with weights_only_loads():
        if saved_world_size == world_size:
            path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_lr_scheduler_states=False)
        else:
            path = _load_universal(engine, directory, saved_world_size, world_size, rank)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
        if extra:
            extra_file = directory / EXTRA_FILE
            if not extra_file.exists():
                raise FileNotFoundError(f"{extra_file}: the checkpoint holds no {sorted(extra)} (it was "
                                        "saved without them, e.g. before train.ema_decay was set)")
            saved = _unflatten(load_file(str(extra_file)))
            for key in extra:
                extra[key] = saved[key]


def _load_universal(engine: Any, directory: Path, saved_world_size: int, world_size: int,
                    rank: int) -> str | None:
    from deepspeed.checkpoint import ds_to_universal

    # Each rank converts its own copy: ranks need not share a filesystem. The converted files go to a
    # scratch directory, so the checkpoint directory stays as it was saved.
    scratch = directory / f".universal-{rank:05d}-{uuid.uuid4().hex[:8]}"
    args = argparse.Namespace(input_folder=str(directory / TAG), output_folder=str(scratch / TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)
    config = engine._config
    stage = engine.zero_optimization_stage()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as progress:
            ds_to_universal.main(args)
        log.debug("ds_to_universal: %s", progress.getvalue())
        config.load_universal_checkpoint = True
        path, _ = engine.load_checkpoint(str(scratch), tag=TAG, load_lr_scheduler_states=False)
        if stage == 3:
            _repair_stage3_universal_load(engine.optimizer, scratch / TAG / "zero" / "optimizer_state.pt")
    finally:
        config.load_universal_checkpoint = False
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("rank %d: loaded a ZeRO-%d checkpoint of %d ranks on %d through a universal checkpoint",
             rank, stage, saved_world_size, world_size)
    return path


def _repair_stage3_universal_load(optimizer: Any, optimizer_state_file: Path) -> None:
    """deepspeed 0.19.8's ZeRO-3 universal load gives every param group the hyperparameters of the first
    (so no-decay groups would get weight decay) and one shared `step` tensor to every group (so AdamW's
    in-place increments advance it once per group). Put back per-group values and separate steps."""
    saved = torch.load(optimizer_state_file, map_location="cpu", weights_only=True)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    for group, saved_group in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_full_state_dict(directory: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights (or its EMA) from a DeepSpeedStrategy checkpoint, in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = Path(directory)
    with weights_only_loads():
        if use_ema:
            extra_file = directory / EXTRA_FILE
            if not extra_file.exists():
                raise FileNotFoundError(f"{extra_file}: this checkpoint holds no EMA "
                                        "(train.ema_decay was unset)")
            return _unflatten(load_file(str(extra_file)))["ema"]
        with contextlib.redirect_stdout(io.StringIO()):
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG))


def _flatten(extra: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{key}/{name}": t.detach().contiguous().cpu() for key, tensors in extra.items()
            for name, t in tensors.items()}


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, t in flat.items():
        key, name = path.split("/", 1)
        out.setdefault(key, {})[name] = t
    return out


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside (DeepSpeed's included, which pass weights_only=False) unpickles only
    tensors, containers and the DeepSpeed classes its checkpoint files are known to hold."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # read by torch.load on every call
    try:
        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


__all__ = ["EXTRA_FILE", "TAG", "UNIVERSAL_INFO", "files_for_rank", "load", "load_full_state_dict", "save",
           "weights_only_loads"]

"""Multi-process runs of the strategies for tests: gloo process groups in spawned processes (no Ray).

`spawn(job, world_size, tmp_path, *args)` runs `job(rank, world_size, out_dir, *args)` in `world_size`
fresh processes that share a gloo process group; jobs must be module-level functions, and pass results
back as files in out_dir (`save_result` / `load_result`). A rank whose job returned ends without finalizing
its interpreter (see `_exit_without_finalizing`): what a job leaves behind must be written by then.

The data is a deterministic global batch per step, split over ranks the way the data feed does it:
contiguous rows per rank, micro-batches of at most train.micro_batch_size rows, and all-ignored padding
micro-batches for ranks whose share is short, so every rank takes cfg.accumulation_steps(step, ws).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrainer.config import Config, load_config

TINY = [
    "model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.multiple_of=32", "model.max_seq_len=32", "model.tie_embeddings=true", "model.qk_norm=true",
    "precision.dtype=fp32", "train.seq_len=32", "train.global_batch_tokens=192", "train.micro_batch_size=2",
    "optim.lr=1e-2", "optim.grad_clip=0.5", "schedule.warmup_steps=1", "train.steps=8", "parallel.max_workers=2",
    # from step 2 on the rows are half as long and twice as many: the micro-step count per rank changes
    "data.phases=[{start_step: 0}, {start_step: 2, seq_len: 16}]",
]


def tiny_config(strategy: str = "ddp", *overrides: str) -> Config:
    return load_config(None, [*TINY, f"parallel.strategy={strategy}", *overrides])


# ---------------------------------------------------------------------------------------------- data


def global_batch(cfg: Config, step: int) -> dict[str, torch.Tensor]:
    """Every row of one global batch: two documents per row, labels shifted, no prediction across them."""
    seq_len = cfg.seq_len_at(step)
    rows = cfg.rows_per_global_batch(step)
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, seq_len + 1), generator=g)
    split = torch.randint(2, seq_len - 2, (rows,), generator=g)
    position = torch.arange(seq_len).expand(rows, seq_len)
    doc_ids = (position >= split[:, None]).long()
    position_ids = torch.where(doc_ids == 0, position, position - split[:, None])
    labels = tokens[:, 1:].clone()
    labels[torch.arange(rows), split - 1] = -100  # the first document's last token: no target across
    return {"input_ids": tokens[:, :-1], "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


def rank_micro_batches(cfg: Config, step: int, rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    batch = global_batch(cfg, step)
    rows = cfg.rows_per_global_batch(step)
    per_rank = math.ceil(rows / world_size)
    mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    size = cfg.train.micro_batch_size
    n = mine["input_ids"].shape[0]
    micro = [{k: v[i:i + size] for k, v in mine.items()} for i in range(0, n, size)]
    while len(micro) < cfg.accumulation_steps(step, world_size):
        pad = {k: v[:1].clone() for k, v in batch.items()}
        pad["labels"].fill_(-100)
        micro.append(pad)
    return micro


def probe_batch(cfg: Config) -> torch.Tensor:
    return torch.randint(0, cfg.model.vocab_size, (3, cfg.train.seq_len), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, job, args: tuple) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        job(rank, world_size, Path(out_dir), *args)
    finally:
        dist.destroy_process_group()
    # A job that raised never gets here: torch.multiprocessing writes its traceback for the parent, which
    # reports it however this process then ends.
    _exit_without_finalizing()


def _exit_without_finalizing() -> NoReturn:
    """End a rank whose job is done the way a forked multiprocessing child ends: non-daemon threads joined,
    logs and streams flushed, then os._exit(0), so the interpreter is never finalized.

    destroy_process_group() only unregisters the gloo groups. The ones still referenced (DeepSpeed's
    deepspeed.utils.groups and the `_dp_group` of every ZeRO parameter; DDP keeps the default group alive
    from C++) live on, and so do their worker threads. Such a thread drops a finished collective's work,
    and with it the work's tensors; where Python released a tensor first, freeing it takes the GIL. A
    thread that asks for the GIL while Python 3.11 finalizes is ended with pthread_exit, whose forced
    unwinding stops at the noexcept destructor it runs in: std::terminate ("terminate called without an
    active exception") and SIGABRT, though the job had succeeded. Without finalization nothing asks."""
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()  # what interpreter shutdown would wait for
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(job, world_size: int, out_dir: Path, *args) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, _free_port(), str(out_dir), job, args), nprocs=world_size, join=True)


def save_result(out_dir: Path, name: str, rank: int, value) -> None:
    torch.save(value, out_dir / f"{name}.rank{rank}.pt")


def load_result(out_dir: Path, name: str, rank: int = 0):
    return torch.load(out_dir / f"{name}.rank{rank}.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------- training


def build(cfg: Config, rank: int, world_size: int, model: torch.nn.Module | None = None):
    """The strategy and step engine for cfg, from the run's seed (as the Ray worker builds them)."""
    from raytrainer.model import Transformer
    from raytrainer.train.engine import StepEngine
    from raytrainer.train.strategies import build_strategy

    torch.manual_seed(cfg.train.seed)
    model = model if model is not None else Transformer(cfg.model)
    strategy = build_strategy(cfg, model, rank, world_size, torch.device("cpu"))
    return strategy, StepEngine(strategy.model, cfg, strategy)


def train_steps(engine, cfg: Config, steps, rank: int, world_size: int) -> list[tuple[float, float]]:
    """(loss, pre-clip grad norm) per step. The ranks of a tensor-parallel group train on the same rows."""
    dims = engine.strategy.dims
    curve = []
    for step in steps:
        stats = engine.forward_backward(rank_micro_batches(cfg, step, dims.dp_rank(rank), dims.dp), step)
        engine.apply()
        curve.append((stats.loss, stats.grad_norm))
    return curve


@torch.no_grad()
def probe_logits(strategy, cfg: Config) -> torch.Tensor:
    logits = strategy.model(probe_batch(cfg)).logits.detach().float()
    if strategy.dims.tp > 1:  # each rank of a tensor-parallel group has its slice of the vocabulary
        parts = [torch.empty_like(logits) for _ in range(strategy.dims.tp)]
        dist.all_gather(parts, logits.contiguous(), group=strategy.mesh["tp"].get_group())
        logits = torch.cat(parts, dim=-1)
    return logits.clone()


def merge_rank_dirs(rank_dirs: list[Path], into: Path) -> Path:
    """What the checkpoint store does: every rank's files, side by side in one directory."""
    import shutil

    for d in rank_dirs:
        shutil.copytree(d, into, dirs_exist_ok=True)
    return into


def load_as_a_resume_would(engine, out_dir: Path, source: str, name: str, rank: int, world_size: int) -> None:
    """Load the checkpoint every rank saved under out_dir/source/rank<r> as a resume from object storage does:
    the ranks' files side by side, and only those this rank's load reads fetched."""
    import shutil

    merged = merge_rank_dirs(sorted((out_dir / source).iterdir()), out_dir / f"merged-{name}-{rank}")
    names = [p.name for p in merged.iterdir()]
    needed = engine.checkpoint_files(merged, names, saved_world_size=world_size)
    fetched = out_dir / f"fetched-{name}-{rank}"
    fetched.mkdir()
    for file in needed:
        shutil.copy(merged / file, fetched / file)
    engine.load_checkpoint(fetched, saved_world_size=world_size)


def first_step_gradients(engine, cfg: Config, rank: int, token_losses: bool = False) -> dict[str, torch.Tensor]:
    """This rank's parameters' whole gradients after step 0's backward (the step is then dropped)."""
    from torch.distributed.tensor import DTensor

    dims = engine.strategy.dims
    engine.forward_backward(rank_micro_batches(cfg, 0, dims.dp_rank(rank), dims.dp), 0, token_losses=token_losses)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in engine.strategy.module.named_parameters()}
    engine.zero_grad()
    return grads


def curve_run(cfg: Config, rank: int, world_size: int, steps, token_losses: bool = False):
    """Step 0's gradients, the loss / grad-norm curve over `steps` and an evaluation, and the engine after them:
    what a model-parallel run is compared with one process by (assert_follows_the_reference)."""
    _, engine = build(cfg, rank, world_size)
    grads = first_step_gradients(engine, cfg, rank, token_losses)
    curve = torch.tensor(train_steps(engine, cfg, steps, rank, world_size))
    return {"grads": grads, "curve": curve, "eval": evaluation(engine, cfg, rank)}, engine


def single_process_curve(cfg: Config, steps, token_losses: bool = False):
    """curve_run in this process on one thread (as each spawned rank runs), the thread count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return curve_run(cfg, 0, 1, steps, token_losses)
    finally:
        torch.set_num_threads(threads)


def evaluation(engine, cfg: Config, rank: int) -> tuple[float, int]:
    """The validation loss and label count of two global batches (those of steps 5 and 6), split as for training."""
    dims = engine.strategy.dims
    return engine.evaluate([rank_micro_batches(cfg, step, dims.dp_rank(rank), dims.dp) for step in (5, 6)])


def assert_follows_the_reference(runs: list[dict], reference: dict) -> None:
    """Every rank of a model-parallel run reports one loss / grad-norm curve and evaluation, and they are the
    single process's (whose every step clipped its gradients)."""
    import pytest

    for run in runs[1:]:
        assert torch.equal(run["curve"], runs[0]["curve"]), "ranks disagree on the global loss / grad norm"
        assert run["eval"] == runs[0]["eval"]
    assert (reference["curve"][:, 1] > 0.5).all()  # above the clip threshold: every step exercised clipping
    torch.testing.assert_close(runs[0]["curve"], reference["curve"], rtol=2e-5, atol=2e-6)
    assert runs[0]["eval"][1] == reference["eval"][1]
    assert runs[0]["eval"][0] == pytest.approx(reference["eval"][0], rel=1e-5)


def assert_same_gradients(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

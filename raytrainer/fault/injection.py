"""Fault injection: rehearse an incident on purpose, in tests or on a real cluster.

Each entry of the config's `faults` list fires at one global step on one rank::

    injector = FaultInjector(cfg, rank, hooks=hooks, model=model)      # model: for nan_loss / grad_explode
    micro_batches = injector.before_forward(step, micro_batches)        # every step, before forward/backward

Kinds:
- `loss_spike`: a poisoned batch. Every labelled position of the rank's micro-batches gets a random input
  token and a random target, so the loss jumps far above its running mean.
- `shuffle_labels`: the targets are permuted within each row (ignored positions stay ignored).
- `grad_explode`: the loss of this step's forward passes is multiplied by `scale`, and so is every gradient.
- `nan_loss`: the loss of this step's forward passes becomes NaN (so do the gradients).
- `grad_bitflip`: one bit of the exponent of one gradient element flips on this rank after the backward,
  as failing memory or a bad core would do (a silent data corruption). It does not happen again when the
  guardian recomputes the step, so the rerun tells it from a fault in the data. Needs the step engine
  (`attach_engine`).

- `slow_rank`: from `step`, for `steps` steps, this rank's forwards take `seconds` longer (a straggler: a
  slow GPU, a throttled host). Fires every time those steps are reached.

A guardian rerun (`before_rerun`) replays the batch faults (the micro-batches are the same ones) and the loss
faults (they stand for a fault in the data or the model: they reproduce); only `grad_bitflip` is one-off.
- `sigterm`: the process sends itself SIGTERM, as a scheduler or a spot reclaim would (the worker's stop notice
  turns it into a checkpoint of the whole group; without one, the process stops).
- `crash`: the process exits at once with INJECTED_CRASH_EXIT_CODE, as if the node died.
- `hang`: the process sleeps forever inside the step; the step watchdog ends it.
- `s3_outage`: calls `hooks["s3_outage"](step)`; a test stops its S3 server there (and restarts it later).

Loss faults work through a forward hook on the model (`model=` or `attach(model)`), so the step engine
needs no knowledge of them; the hook applies to the step's micro-batch forwards only.

`once` (the default): an injection fires the first time its step is reached and never again in this run,
even when a rollback replays the step or the worker group restarts from an earlier checkpoint. Before it
fires, a marker object `faults/fired-step<step>-rank<rank>-<kind>.json` is written to the run's guardian
store (default `<checkpoint.storage>/<run.name>/guardian/`), and every injector of the run reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from raytrainer.config import Config, FaultInjection
from raytrainer.fault.events import RunStore, TextStore

log = logging.getLogger("raytrainer.guardian")

INJECTED_CRASH_EXIT_CODE = 87  # distinct from the watchdog's 86 and from real failures
BATCH_FAULTS = frozenset({"loss_spike", "shuffle_labels"})
LOSS_FAULTS = frozenset({"nan_loss", "grad_explode"})
FLIPPED_BIT = 1 << 30  # the highest exponent bit of a float32: an element below 1 in size grows 2^128x
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- pure transforms


def poison_tokens(micro_batches: list[dict], vocab_size: int, generator: torch.Generator) -> list[dict]:
    """Random input tokens and random targets at every labelled position (padding is left alone)."""
    out = []
    for mb in micro_batches:
        mb = dict(mb)
        labelled = mb["labels"] != IGNORE_INDEX
        shape = mb["labels"].shape
        mb["input_ids"] = torch.where(labelled, torch.randint(0, vocab_size, shape, generator=generator),
                                      mb["input_ids"])
        mb["labels"] = torch.where(labelled, torch.randint(0, vocab_size, shape, generator=generator),
                                   mb["labels"])
        out.append(mb)
    return out


def shuffle_labels(micro_batches: list[dict], generator: torch.Generator) -> list[dict]:
    """Permute the targets among the labelled positions of each row; ignored positions stay ignored."""
    out = []
    for mb in micro_batches:
        mb = dict(mb)
        labels = mb["labels"].clone()
        for row in range(labels.shape[0]):
            idx = (labels[row] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
            labels[row, idx] = labels[row, idx[torch.randperm(len(idx), generator=generator)]]
        mb["labels"] = labels
        out.append(mb)
    return out


def map_loss(output: Any, fn: Callable[[torch.Tensor], torch.Tensor], metrics_too: bool = False) -> Any:
    """Apply `fn` to a model output's loss: a tensor, a dict with "loss", or an object with .loss
    (ModelOutput). metrics_too: also to the floating-point entries of .metrics (the reported loss)."""
    if torch.is_tensor(output):
        return fn(output)
    if isinstance(output, dict):
        return {**output, "loss": fn(output["loss"])} if output.get("loss") is not None else output
    if getattr(output, "loss", None) is None:
        return output
    changes: dict[str, Any] = {"loss": fn(output.loss)}
    metrics = getattr(output, "metrics", None)
    if metrics_too and isinstance(metrics, dict):
        changes["metrics"] = {k: fn(v) if torch.is_tensor(v) and v.is_floating_point() and k != "label_tokens"
                              else v for k, v in metrics.items()}
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, **changes)
    if hasattr(output, "_replace"):
        return output._replace(**changes)
    for key, value in changes.items():
        setattr(output, key, value)
    return output


def _hang_forever() -> None:
    while True:
        time.sleep(3600)


# --------------------------------------------------------------------------- the injector


class FaultInjector:
    """Fires the config's fault injections for one rank at the right steps (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        rank: int,
        hooks: dict[str, Callable[..., Any]] | None = None,
        store: TextStore | None = None,
        model: torch.nn.Module | None = None,
        exit_fn: Callable[[int], None] = os._exit,
        hang_fn: Callable[[], None] = _hang_forever,
    ):
        self.cfg = cfg
        self.rank = rank
        self.hooks = dict(hooks or {})
        self.faults = [f for f in cfg.faults if f.rank == rank]
        for i, f in enumerate(cfg.faults):
            if f.kind == "s3_outage" and f.rank == rank and "s3_outage" not in self.hooks:
                raise ValueError(
                    f"faults[{i}] (kind=s3_outage, step={f.step}) needs a hook: pass "
                    "hooks={'s3_outage': fn(step)} that takes the object store down"
                )
        self.store = store if store is not None else (RunStore.for_run(cfg) if self.faults else None)
        self.exit_fn = exit_fn
        self.hang_fn = hang_fn
        self._fired_here: set[str] = set()  # also covers a store that cannot be written
        self._loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._loss_calls = 0
        self._metrics_too = False
        self._model_hooked = False
        self._rearm: tuple[Callable[[torch.Tensor], torch.Tensor], int, bool] | None = None  # for a rerun
        self._flip_at: int | None = None  # the step whose gradients get a flipped bit
        self._slow_s = 0.0  # slow_rank: still to be slept in this step's forwards
        self._module: torch.nn.Module | None = None
        if model is not None:
            self.attach(model)

    def attach_engine(self, engine: Any, module: torch.nn.Module) -> None:
        """Hook the step engine so grad_bitflip can reach `module`'s gradients after the backward."""
        self._module = module
        engine.gradient_hooks.append(self._after_backward)

    def before_rerun(self, step: int) -> None:
        """The guardian recomputes `step`: a loss fault fired at it fires again (it reproduces)."""
        if self._rearm is not None:
            self._loss_fn, self._loss_calls, self._metrics_too = self._rearm

    def attach(self, model: torch.nn.Module) -> None:
        """Hook the (possibly wrapped) model so nan_loss / grad_explode can reach the loss."""
        model.register_forward_hook(self._on_forward)
        self._model_hooked = True

    def due(self, step: int) -> list[FaultInjection]:
        """This rank's injections at `step` that should fire now (a `once` injection fires a single time)."""
        return [f for f in self.faults if f.step == step and f.kind != "slow_rank" and
                not (f.once and self.has_fired(f))]

    def slow_for(self, step: int) -> float:
        """Seconds of slowness this rank's forwards get at `step`."""
        return sum(f.seconds for f in self.faults if f.kind == "slow_rank" and f.step <= step < f.step + f.steps)

    def has_fired(self, fault: FaultInjection) -> bool:
        key = self._marker(fault)
        if key in self._fired_here:
            return True
        try:
            return self.store is not None and self.store.exists(key)
        except Exception as e:  # a store outage must not turn into a crash loop here
            log.warning("fault injection: cannot read marker %s (%s); assuming it has not fired", key, e)
            return False

    def before_forward(self, step: int, micro_batches: list[dict]) -> list[dict]:
        """Fire what is due at `step`; returns the (possibly corrupted) micro-batches to train on."""
        self._loss_fn, self._loss_calls, self._rearm = None, 0, None
        self._slow_s = self.slow_for(step)
        for fault in self.due(step):
            self._mark_fired(fault)
            log.warning("fault injection: %s at step %d on rank %d", fault.kind, step, self.rank)
            micro_batches = self._fire(fault, step, micro_batches)
        return micro_batches

    # ------------------------------------------------------------------ internals

    def _fire(self, fault: FaultInjection, step: int, micro_batches: list[dict]) -> list[dict]:
        generator = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step * 101 + self.rank)
        kind = fault.kind
        if kind == "loss_spike":
            return poison_tokens(micro_batches, self.cfg.model.vocab_size, generator)
        if kind == "shuffle_labels":
            return shuffle_labels(micro_batches, generator)
        if kind in LOSS_FAULTS:
            if not self._model_hooked:
                raise RuntimeError(f"fault injection {kind} at step {step} needs the model: "
                                   "FaultInjector(..., model=model) or injector.attach(model)")
            scale = fault.scale
            if kind == "nan_loss":
                self._loss_fn = lambda loss: loss * float("nan")
            else:
                self._loss_fn = lambda loss: loss * scale
            self._metrics_too = kind == "nan_loss"
            self._loss_calls = len(micro_batches)
            self._rearm = (self._loss_fn, self._loss_calls, self._metrics_too)
            return micro_batches
        if kind == "grad_bitflip":
            if self._module is None:
                raise RuntimeError(f"fault injection grad_bitflip at step {step} needs the step engine: "
                                   "injector.attach_engine(engine, module)")
            self._flip_at = step
            return micro_batches
        if kind == "s3_outage":
            self.hooks["s3_outage"](step)
            return micro_batches
        if kind == "sigterm":
            log.warning("fault injection: SIGTERM to rank %d's own process at step %d", self.rank, step)
            os.kill(os.getpid(), signal.SIGTERM)
            return micro_batches
        if kind == "crash":
            print(f"fault injection: crashing rank {self.rank} at step {step} "
                  f"(exit code {INJECTED_CRASH_EXIT_CODE})", file=sys.stderr, flush=True)
            self.exit_fn(INJECTED_CRASH_EXIT_CODE)
            return micro_batches
        if kind == "hang":
            print(f"fault injection: hanging rank {self.rank} at step {step}", file=sys.stderr, flush=True)
            self.hang_fn()
            return micro_batches
        raise ValueError(f"unknown fault kind {kind!r}")

    def _after_backward(self, step: int) -> None:
        if self._flip_at != step:
            return
        self._flip_at = None  # once: a recomputation of the step is clean
        grad = next((p.grad for p in self._module.parameters() if p.grad is not None and p.grad.numel()), None)
        if grad is None:
            return
        flat = grad.view(-1) if grad.is_contiguous() else grad.reshape(-1)
        small = ((flat != 0) & (flat.abs() < 1)).nonzero()
        i = int(small[0]) if len(small) else 0
        element = flat[i:i + 1].to(torch.float32)
        flipped = (element.view(torch.int32) ^ FLIPPED_BIT).view(torch.float32)
        flat[i:i + 1] = flipped.to(flat.dtype)
        log.warning("fault injection: flipped an exponent bit of a gradient on rank %d at step %d (%.3g -> %.3g)",
                    self.rank, step, float(element), float(flipped))

    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self._slow_s > 0:
            time.sleep(self._slow_s)  # inside the forward: counted as this rank's own compute
            self._slow_s = 0.0
        if self._loss_fn is None or self._loss_calls <= 0:
            return None
        self._loss_calls -= 1
        return map_loss(output, self._loss_fn, metrics_too=self._metrics_too)

    def _marker(self, fault: FaultInjection) -> str:
        return f"faults/fired-step{fault.step:08d}-rank{fault.rank}-{fault.kind}.json"

    def _mark_fired(self, fault: FaultInjection) -> None:
        key = self._marker(fault)
        self._fired_here.add(key)
        if self.store is None or not fault.once:
            return
        record = {"step": fault.step, "rank": fault.rank, "kind": fault.kind, "time": time.time(),
                  "pid": os.getpid()}
        try:
            self.store.write_text(key, json.dumps(record))
        except Exception as e:  # fire anyway; a restart may fire it again, which the warning says
            log.warning("fault injection: could not write marker %s to %s (%s); a restart may fire it again",
                        key, self.store, e)

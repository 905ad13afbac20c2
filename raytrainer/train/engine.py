"""One training step: accumulate micro-batches, measure, and apply (or not) the optimizer update.

    stats = engine.forward_backward(micro_batches, step)   # loss over the global batch, pre-clip grad norm
    ... the guardian looks at stats ...
    engine.apply(skip=False, lr_factor=1.0)                 # optimizer step, loss scaler, EMA, zero_grad

The loss of every micro-batch is its summed token loss divided by (global label tokens / world size), so
after the data-parallel gradient average the gradient is exactly that of the mean loss over the whole
global batch, whatever the world size and however the rows were split (padding micro-batches included).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raytrainer.config import Config
from raytrainer.train.ema import EMA
from raytrainer.train.optim import set_lr
from raytrainer.train.precision import DynamicLossScaler, autocast
from raytrainer.train.schedule import lr_at

log = logging.getLogger("raytrainer.train")

IGNORE_INDEX = -100


@dataclass
class StepStats:
    step: int
    loss: float  # mean cross-entropy per label token over the global batch
    grad_norm: float  # global, before clipping (after fp16 unscaling)
    finite: bool
    tokens: int  # global tokens in the step's rows (padding included: what the hardware processed)
    label_tokens: int  # global tokens with a target
    time_s: float
    seq_len: int
    metrics: dict = field(default_factory=dict)


def prepare_model(model: nn.Module, cfg: Config) -> nn.Module:
    """Activation checkpointing (and fp8) on the plain model, before any wrapping."""
    from raytrainer.model.checkpointing import apply_activation_checkpointing

    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.precision.dtype == "fp8":
        from raytrainer.train.precision import enable_fp8

        model = enable_fp8(model)
    return model


class StepEngine:
    def __init__(self, model: nn.Module, cfg: Config, strategy):
        self.cfg = cfg
        self.strategy = strategy
        self.model = model
        self.scaler = DynamicLossScaler(cfg.precision)
        self.ema = EMA(strategy.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.current_lr = lr_at(0, cfg)
        self._forward = torch.compile(model) if cfg.train.compile else model
        self._step: int | None = None
        self._finite = True
        self._owns_step = getattr(strategy, "owns_step", False)  # DeepSpeed applies scaling itself

    # ------------------------------------------------------------------ the step

    def forward_backward(self, micro_batches: list[dict], step: int) -> StepStats:
        t0 = time.perf_counter()
        s = self.strategy
        local_labels = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        global_labels = s.all_reduce_sum(local_labels)
        normalizer = max(global_labels, 1.0) / s.world_size
        ce_sum = 0.0
        device = s.device
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else s.no_sync():
                with autocast(self.cfg.precision.dtype, device):
                    out = self._forward(
                        mb["input_ids"].to(device, non_blocking=True),
                        labels=mb["labels"].to(device, non_blocking=True),
                        position_ids=mb["position_ids"].to(device, non_blocking=True),
                        doc_ids=mb["doc_ids"].to(device, non_blocking=True),
                        loss_normalizer=normalizer,
                    )
                s.backward(out.loss * self.scaler.scale if not self._owns_step else out.loss)
            ce_sum += float(out.metrics["ce"]) * int(out.metrics["label_tokens"])
        loss = s.all_reduce_sum(ce_sum) / max(global_labels, 1.0)
        if not self._owns_step:
            s.unscale_grads(self.scaler.scale)
        grad_norm = s.clip_grad_norm(self.cfg.optim.grad_clip)
        self._finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not self._finite:
            log.error("step %d: NON-FINITE loss=%s grad_norm=%s on rank %d; this update will not be applied",
                      step, loss, grad_norm, s.rank)
        self._step = step
        seq_len = micro_batches[0]["input_ids"].shape[1]
        tokens = self.cfg.rows_per_global_batch(step) * seq_len
        return StepStats(step, loss, grad_norm, self._finite, tokens, int(global_labels),
                         time.perf_counter() - t0, seq_len)

    def apply(self, skip: bool = False, lr_factor: float = 1.0) -> bool:
        """Apply (or skip) the update prepared by forward_backward; returns whether it was applied."""
        assert self._step is not None, "apply() without forward_backward()"
        self.current_lr = lr_at(self._step, self.cfg) * lr_factor
        set_lr(self.strategy.optimizer, self.current_lr)
        applied = not skip and self._finite
        if applied:
            self.strategy.optimizer_step()
            if self.ema is not None:
                self.ema.update()
        if self.scaler.enabled:
            self.scaler.update(found_inf=not self._finite)
        self.strategy.zero_grad()
        self._step = None
        return applied

    def train_step(self, micro_batches: list[dict], step: int) -> StepStats:
        stats = self.forward_backward(micro_batches, step)
        self.apply()
        return stats

    def zero_grad(self) -> None:
        self.strategy.zero_grad()
        self._step = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state.get("scaler", {}))

    def save_checkpoint(self, directory: Path) -> None:
        extra = {"ema": self.ema.state_dict()} if self.ema is not None else None
        self.strategy.save(Path(directory), extra=extra)

    def load_checkpoint(self, directory: Path, saved_world_size: int) -> None:
        extra = {"ema": self.ema.state_dict()} if self.ema is not None else None
        self.strategy.load(Path(directory), saved_world_size, extra=extra)
        if extra is not None:
            self.ema.load_state_dict(extra["ema"])

"""One training step: accumulate micro-batches, measure, and apply (or not) the optimizer update.

    stats = engine.forward_backward(micro_batches, step)   # loss over the global batch, pre-clip grad norm
    ... the guardian looks at stats ...
    engine.apply(skip=False, lr_factor=1.0)                 # optimizer step, loss scaler, EMA, zero_grad

The loss of every micro-batch is its summed token loss divided by (global label tokens / world size), so
after the data-parallel gradient average the gradient is exactly that of the mean loss over the whole
global batch, whatever the world size and however the rows were split (padding micro-batches included).
The global label-token count is all-reduced once per step, before the first forward.

A step whose loss or gradients are not finite is never applied: forward_backward logs it loudly with its
step, and apply() refuses the update even when asked to apply it (and says so).

    stats2 = engine.recompute(micro_batches, step)          # the same step again, before any update

recompute() drops the pending gradients and runs the same micro-batches from the same parameters and RNG
state: the guardian's way to tell a reproducible anomaly (the data, the model's state) from a transient one
(the hardware). To compare the two runs rank by rank, every rank's summed loss and gradient norm travel in
the one collective a step already makes (`rank_ce_sum`, `rank_grad_norm` in StepStats.metrics).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raytrainer.config import Config, ModelConfig
from raytrainer.model.flops import attended_pairs
from raytrainer.model.loss import token_ce
from raytrainer.model.moe import update_balance_bias
from raytrainer.train.context_parallel import gather_sequence, shard_sequence
from raytrainer.train.ema import EMA
from raytrainer.train.optim import set_lr
from raytrainer.train.precision import DynamicLossScaler, autocast, check_precision_supported
from raytrainer.train.schedule import lr_at

log = logging.getLogger("raytrainer.train")

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "labels", "position_ids", "doc_ids")


@dataclass
class StepStats:
    step: int
    loss: float  # mean cross-entropy per label token over the global batch
    grad_norm: float  # global, before clipping (after fp16 unscaling)
    finite: bool  # loss and gradients finite: the update may be applied
    tokens: int  # global tokens in the step's rows (padding included: what the hardware processed)
    label_tokens: int  # global tokens with a target
    time_s: float  # forward_backward, plus apply() once it has run
    seq_len: int
    overflow: bool = False  # fp16: the gradients overflowed at this loss scale (skipped, scale halved)
    applied: bool | None = None  # set by apply(): whether the optimizer update happened
    metrics: dict = field(default_factory=dict)  # timings, loss scale
    token_ce: list[torch.Tensor] | None = None  # asked for: each micro-batch's per-token loss [B, T] (CPU)
    attended_pairs: float = 0.0  # global (query, key) pairs attention computed under document masking (MFU)


class StepEngine:
    def __init__(self, model: nn.Module, cfg: Config, strategy):
        check_precision_supported(cfg.precision.dtype, strategy.device)
        self.cfg = cfg
        self.strategy = strategy
        self.model = model  # what forward is called on: strategy.model
        self._owns_step = getattr(strategy, "owns_step", False)  # DeepSpeed scales, unscales and steps itself
        self.scaler = DynamicLossScaler(cfg.precision)
        if self._owns_step:
            self.scaler.enabled, self.scaler.scale = False, 1.0
        self.ema = EMA(strategy.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.current_lr = lr_at(0, cfg)
        self.updates_applied = 0
        self.updates_skipped = 0
        self._pending: StepStats | None = None  # the step whose gradients wait for apply()
        self._rng_before: tuple | None = None  # the RNG state the pending step started from
        self._recomputing = False
        self._expert_load: torch.Tensor | None = None  # mixture of experts: the pending step's load, every rank's
        # Called with the step number after the backward, before the gradient norm: fault injection's way to
        # corrupt one rank's gradients as failing hardware would.
        self.gradient_hooks: list[Callable[[int], None]] = []

    # ------------------------------------------------------------------ the step

    def forward_backward(self, micro_batches: list[dict], step: int, data_wait_s: float = 0.0,
                         token_losses: bool = False, stopping: bool = False) -> StepStats:
        """Forward and backward every micro-batch of this rank; gradients are synchronised on the last one.
        Returns the global loss and pre-clip grad norm, and every rank's time for this step so far
        (`data_wait_s`, the wait for its batch, plus its forward, backward and norm), own time (its data wait
        and forwards, which wait on no other rank), summed loss and grad norm. `token_losses`: also every
        token's loss (StepStats.token_ce), e.g. to tell which documents carry a spike. `stopping`: this rank was
        told to stop; every rank learns it from the same collective (`rank_stopping`)."""
        if self._pending is not None:
            raise RuntimeError(f"forward_backward(step={step}) while step {self._pending.step} still waits for "
                               "apply() or zero_grad(): its gradients would leak into this step")
        if not micro_batches:
            raise ValueError(f"step {step}: no micro-batches (every rank takes cfg.accumulation_steps >= 1)")
        self._rng_before = _rng_state(self.strategy.device)
        t0 = time.perf_counter()
        s = self.strategy
        device = s.device
        # Every rank of a replica (a tensor-parallel group, a pipeline's stages) trains on the same rows: `copies` of
        # each row across the world; `loss_copies` of its loss (the ranks of the stage that computes it).
        copies, loss_copies = s.dims.replica_size, s.dims.tp
        local_labels = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        global_labels = s.all_reduce_sum(local_labels) / copies
        # each rank's loss sums its own tokens: over dp x cp ranks (context parallel splits rows between ranks)
        normalizer = max(global_labels, 1.0) / (s.dims.dp * s.dims.cp)
        ce_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync per step
        last = len(micro_batches) - 1
        forward = Stopwatch(device)  # this rank's own compute: a forward waits on no other rank's
        per_token: list[torch.Tensor] | None = [] if token_losses else None
        causal = not self.cfg.model.bidirectional
        pairs = sum(attended_pairs(mb.get("doc_ids"), tuple(mb["input_ids"].shape), causal) for mb in micro_batches)
        routing = RoutingTally(self.cfg.model)

        def take(out) -> None:  # what a step keeps of a micro-batch's output
            nonlocal ce_sum
            ce_sum += out.metrics["ce"].detach().double() * out.metrics["label_tokens"]
            routing.add(out.metrics)
            if per_token is not None:
                per_token.append(out.metrics["token_ce"].cpu())

        pipeline = getattr(s, "pipeline", None)
        if pipeline is not None:  # the schedule runs every micro-batch; the losses come out at the last stage
            blocks_before = pipeline.block_seconds
            with autocast(self.cfg.precision.dtype, device):
                outputs = pipeline.train(micro_batches, normalizer, self.scaler.scale_loss, token_losses)
            for out in outputs:
                take(out)
            forward.add(pipeline.block_seconds - blocks_before)
        for i, mb in enumerate(micro_batches if pipeline is None else []):
            inputs = self._inputs(mb)
            with contextlib.nullcontext() if i == last else s.no_sync():
                with autocast(self.cfg.precision.dtype, device), forward:
                    out = self.model(**inputs, loss_normalizer=normalizer)
                s.backward(self.scaler.scale_loss(out.loss))
            if per_token is not None and "token_ce" not in out.metrics:  # the chunked loss has no logits
                out.metrics["token_ce"] = token_ce(out.logits, inputs["labels"])
            if per_token is not None and s.dims.cp > 1:  # every rank's share of the rows, whole again
                out.metrics["token_ce"] = gather_sequence(out.metrics["token_ce"], 1, s.mesh["cp"].get_group(),
                                                          s.dims.cp)
            take(out)
        s.finish_gradients()
        t_backward = time.perf_counter()
        for hook in self.gradient_hooks:
            hook(step)
        if self.scaler.enabled:
            s.unscale_grads(self.scaler.scale)
        grad_norm = s.clip_grad_norm(self.cfg.optim.grad_clip)
        # One collective gives the loss and every rank's busy time, loss and grad norm: a straggler shows in
        # the metrics, and a rank whose gradients differ from the others' (they are the same numbers on every
        # rank once reduced) can be named.
        per_rank = s.all_gather_floats([float(ce_sum), data_wait_s + time.perf_counter() - t0, data_wait_s,
                                        float(grad_norm), data_wait_s + forward.seconds(), float(stopping),
                                        float(pairs), *routing.load_values()])
        loss = math.fsum(r[0] for r in per_rank) / loss_copies / max(global_labels, 1.0)

        # Judged on every rank's norm, so that every rank takes the same view of whether it may apply.
        grads_finite = all(math.isfinite(r[3]) for r in per_rank)
        finite = math.isfinite(loss) and grads_finite
        overflow = self.cfg.precision.dtype == "fp16" and math.isfinite(loss) and not grads_finite
        if overflow and s.rank == 0:  # the loss and norm are global: one line, from rank 0
            log.warning("step %d: fp16 gradients overflowed at loss scale %g; the update is skipped and the "
                        "scale halved", step, self.scaler.scale)
        elif not finite and s.rank == 0:
            # Not yet a decision: the guardian may recompute the step and apply a clean rerun (a transient fault).
            log.error("step %d: NON-FINITE loss=%s grad_norm=%s%s; no non-finite update is ever applied", step, loss,
                      grad_norm, " on the recomputation" if self._recomputing else "")
        seq_len = micro_batches[0]["input_ids"].shape[1]
        stats = StepStats(
            step=step,
            loss=loss,
            grad_norm=grad_norm,
            finite=finite,
            tokens=self.cfg.rows_per_global_batch(step) * seq_len,
            label_tokens=int(global_labels),
            time_s=time.perf_counter() - t0,
            seq_len=seq_len,
            overflow=overflow,
            token_ce=per_token,
            attended_pairs=sum(r[6] for r in per_rank) / copies,
            metrics={"forward_backward_s": t_backward - t0, "micro_batches": len(micro_batches),
                     "rank_busy_s": [r[1] for r in per_rank], "rank_data_wait_s": [r[2] for r in per_rank],
                     "rank_ce_sum": [r[0] for r in per_rank], "rank_grad_norm": [r[3] for r in per_rank],
                     "rank_own_s": [r[4] for r in per_rank], "rank_stopping": [r[5] > 0 for r in per_rank]},
        )
        if self.scaler.enabled:
            stats.metrics["loss_scale"] = self.scaler.scale
        if routing.load is not None:
            self._expert_load = routing.global_load([r[7:] for r in per_rank], copies)
            stats.metrics.update(routing.summary(self._expert_load))
        self._pending = stats
        return stats

    def recompute(self, micro_batches: list[dict], step: int, data_wait_s: float = 0.0,
                  token_losses: bool = False) -> StepStats:
        """The pending step again: its gradients dropped, the same micro-batches from the same parameters and
        RNG state. Every rank calls it (it has the step's collectives)."""
        if self._pending is None or self._pending.step != step:
            raise RuntimeError(f"recompute(step={step}) without that step pending: nothing to compare it with")
        rng = self._rng_before
        self.zero_grad()  # the loss scale stays: the same step again, at the same scale
        _set_rng_state(rng, self.strategy.device)
        self._recomputing = True
        try:
            stats = self.forward_backward(micro_batches, step, data_wait_s=data_wait_s, token_losses=token_losses)
        finally:
            self._recomputing = False
        stats.metrics["recomputed"] = True
        return stats

    def evaluate(self, batches: list[list[dict]]) -> tuple[float, int]:
        """Mean cross-entropy per label token over every rank's share of `batches` (each a list of this
        rank's micro-batches; every rank has as many), and the global count of label tokens. No gradients,
        no change to the model or the optimizer."""
        s = self.strategy
        ce_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        labels = 0
        was_training = self.model.training
        self.model.eval()
        s.module.eval()  # a pipeline's stages are under its part of the model, not under the loss module
        pipeline = getattr(s, "pipeline", None)
        try:
            with torch.no_grad():
                for micro_batches in batches:
                    if pipeline is not None:
                        with autocast(self.cfg.precision.dtype, s.device):
                            outputs = pipeline.evaluate(micro_batches)  # the last stage's, none elsewhere
                        for out in outputs:
                            ce_sum += out.metrics["ce"].double() * out.metrics["label_tokens"]
                        labels += sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
                        continue
                    for mb in micro_batches:
                        inputs = self._inputs(mb)
                        n = int((mb["labels"] != IGNORE_INDEX).sum())
                        with autocast(self.cfg.precision.dtype, s.device):
                            out = self.model(**inputs, loss_normalizer=float(max(n, 1)))
                        if int(out.metrics["label_tokens"]):  # this rank's tokens (a share, context parallel)
                            ce_sum += out.metrics["ce"].detach().double() * out.metrics["label_tokens"]
                        labels += n
        finally:
            self.model.train(was_training)
            s.module.train(was_training)
        # the ranks of a replica evaluate the same rows; those of its last stage compute their losses (each
        # context-parallel rank its share of the tokens)
        total = s.all_reduce_sum(float(ce_sum)) / s.dims.tp
        count = round(s.all_reduce_sum(labels) / s.dims.replica_size)
        return total / max(count, 1), count

    def _inputs(self, mb: dict) -> dict[str, torch.Tensor]:
        """A micro-batch on the device, as this rank takes it: with context parallel, its share of every row."""
        s = self.strategy
        inputs = {k: mb[k].to(s.device, non_blocking=True) for k in BATCH_KEYS if mb.get(k) is not None}
        return shard_sequence(inputs, s.dims.cp_rank(s.rank), s.dims.cp) if s.dims.cp > 1 else inputs

    def apply(self, skip: bool = False, lr_factor: float = 1.0) -> bool:
        """Apply (or skip) the update prepared by forward_backward; returns whether it was applied.

        lr = lr_at(step) x lr_factor (x each group's lr_scale). A non-finite step is never applied."""
        stats = self._pending
        if stats is None:
            raise RuntimeError("apply() without forward_backward(): there is no step to apply")
        t0 = time.perf_counter()
        self.current_lr = lr_at(stats.step, self.cfg) * lr_factor
        set_lr(self.strategy.optimizer, self.current_lr)
        applied = not skip and stats.finite
        if not skip and not stats.finite and not stats.overflow and self.strategy.rank == 0:
            log.error("step %d: NOT applying the update: loss=%s grad_norm=%s are not finite",
                      stats.step, stats.loss, stats.grad_norm)
        if applied:
            self.strategy.optimizer_step()
            moe = self.cfg.model.moe
            if moe is not None and moe.balance == "bias" and self._expert_load is not None:
                update_balance_bias(self.strategy.module, self._expert_load, moe.bias_update_rate)
            if self.ema is not None:
                self.ema.update()
            self.updates_applied += 1
        else:
            self.updates_skipped += 1
        self.scaler.update(found_inf=not math.isfinite(stats.grad_norm))
        self.strategy.zero_grad()
        self._pending = None
        stats.applied = applied
        stats.metrics["apply_s"] = time.perf_counter() - t0
        stats.time_s += stats.metrics["apply_s"]
        return applied

    def train_step(self, micro_batches: list[dict], step: int) -> StepStats:
        """forward_backward then apply, skipping (and saying so) a non-finite step."""
        stats = self.forward_backward(micro_batches, step)
        if not self.apply() and not stats.overflow:
            log.warning("step %d skipped: its loss or gradients were not finite", step)
        return stats

    def zero_grad(self) -> None:
        """Drop the pending step's gradients without an update (e.g. before rolling back)."""
        self.strategy.zero_grad()
        self._pending = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """JSON-serialisable engine state (the EMA tensors go with the model, in save_checkpoint)."""
        return {
            "scaler": self.scaler.state_dict(),
            "updates_applied": self.updates_applied,
            "updates_skipped": self.updates_skipped,
            "ema_decay": self.ema.decay if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state.get("scaler", {}))
        self.updates_applied = int(state.get("updates_applied", 0))
        self.updates_skipped = int(state.get("updates_skipped", 0))

    def _checkpoint_extra(self) -> dict | None:
        """The EMA tensors, saved and loaded beside the model through the strategy."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else None

    def save_checkpoint(self, directory: Path) -> None:
        """Model + optimizer (+ EMA) through the strategy; every rank calls it."""
        self.strategy.save(Path(directory), extra=self._checkpoint_extra())

    def stage_checkpoint(self, directory: Path) -> Callable[[], None] | None:
        """Like save_checkpoint, but only copies the state now and returns the function that writes it
        (None where the strategy cannot stage; then call save_checkpoint)."""
        return self.strategy.stage_save(Path(directory), extra=self._checkpoint_extra())

    @property
    def checkpoint_index_files(self) -> tuple[str, ...]:
        """What a rank reads of a checkpoint's model directory before it can say what else it needs."""
        return tuple(self.strategy.checkpoint_index_files)

    def checkpoint_files(self, directory: Path, names: Collection[str], saved_world_size: int) -> set[str]:
        """The files of a checkpoint's model directory (all of them are `names`) that load_checkpoint reads
        on this rank; `directory` need hold only checkpoint_index_files."""
        return self.strategy.files_for_rank(Path(directory), names, saved_world_size,
                                            extra=self._checkpoint_extra())

    def load_checkpoint(self, directory: Path, saved_world_size: int) -> None:
        extra = self._checkpoint_extra()
        self.strategy.load(Path(directory), saved_world_size, extra=extra)
        if extra is not None:
            self.ema.load_state_dict(extra["ema"])
        self._pending = None


class RoutingTally:
    """A mixture-of-experts step's routing on this rank: its load per layer and expert (micro-batches with a
    target only: a padding micro-batch's routing is not the data's) and mean balancing terms."""

    def __init__(self, cfg: ModelConfig):
        # every rank sends a load of the same shape in the step's collective, a rank of padding zeros
        self.load = None if cfg.moe is None else torch.zeros(cfg.n_layers, cfg.moe.n_experts, dtype=torch.float64)
        self.terms: dict[str, float] = {}
        self.micro_batches = 0

    def add(self, metrics: dict) -> None:
        if self.load is None or int(metrics["label_tokens"]) == 0:
            return
        self.load += metrics["moe_load"].detach().to("cpu", torch.float64)
        for key in ("moe_aux_loss", "moe_z_loss", "moe_dropped"):
            self.terms[key] = self.terms.get(key, 0.0) + float(metrics[key])
        self.micro_batches += 1

    def load_values(self) -> list[float]:
        return [] if self.load is None else self.load.reshape(-1).tolist()

    def global_load(self, every_rank: list[list[float]], copies: int) -> torch.Tensor:
        """The load summed over ranks ([layers, experts])."""
        return torch.tensor(every_rank, dtype=torch.float64).sum(0).reshape(self.load.shape) / copies

    def summary(self, load: torch.Tensor) -> dict[str, float]:
        """This rank's mean balancing terms and dropped slots, and the step's worst imbalance over layers: the
        busiest expert's load over the mean."""
        n = max(self.micro_batches, 1)
        out = {"moe_aux_loss": self.terms.get("moe_aux_loss", 0.0) / n,
               "moe_z_loss": self.terms.get("moe_z_loss", 0.0) / n,
               "moe_dropped": self.terms.get("moe_dropped", 0.0)}
        mean = load.mean(dim=1).clamp(min=1e-9)
        out["moe_max_load"] = float((load.max(dim=1).values / mean).max())
        out["moe_min_load"] = float((load.min(dim=1).values / mean).min())
        return out


class Stopwatch:
    """Time spent inside `with stopwatch:` blocks; on a GPU measured by CUDA events (read once the step's
    collective has synchronised), on a CPU by the clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list = []
        self.total = 0.0
        self._t0 = 0.0

    def __enter__(self) -> Stopwatch:
        if self.cuda:
            self.pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.pairs[-1][0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if self.cuda:
            self.pairs[-1][1].record()
        else:
            self.total += time.perf_counter() - self._t0
        return False

    def add(self, seconds: float) -> None:
        """Time measured elsewhere (a pipeline's blocks, timed as they run)."""
        self.total += seconds

    def seconds(self) -> float:
        if self.cuda:
            if self.pairs:
                self.pairs[-1][1].synchronize()  # the step's loss was read already: this does not wait
            return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0 + self.total
        return self.total


def _rng_state(device: torch.device) -> tuple:
    """The generators a forward may draw from (dropout, stochastic layers): a few kilobytes, no sync."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple | None, device: torch.device) -> None:
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)

"""Pipeline parallel: the model's layers split into stages, micro-batches flowing through them on a schedule
(torch.distributed.pipelining); across the pipelines data parallel (ddp) or FSDP2 (fsdp), and within a stage
tensor parallel (parallel.tp, applied to the whole model before it is cut: a stage's blocks pass their
sequence-split activations on as they would to the next block).

    strategy = PipelineStrategy(cfg, model, rank, world_size, device, mesh)    mesh: ("dp", "pp", "tp")
    outputs = strategy.pipeline.train(micro_batches, normalizer, scale_loss)   one step's forwards and backwards
    outputs = strategy.pipeline.evaluate(micro_batches)                        forwards only

The model is cut into pp x pp_stages_per_rank stages of equal depth; stage 0 also holds the embedding, the last
the final norm and lm_head, and the loss is computed at the end of the last stage. A rank holds stages
pp_rank, pp_rank + pp, ... (one, or several for the interleaved schedule). Every rank of a pipeline trains on
the same rows: the first stage reads the tokens, every stage gets the positions and document ids of each
micro-batch (for RoPE and the attention mask), and only the hidden states travel from stage to stage.

`strategy.module` is this rank's part of the model under the whole model's parameter names (layers.5... stays
layers.5...), so the optimizer, EMA and checkpoints see what they would see without pipelining, and a
checkpoint saved by a pipeline loads on any other mesh (and back). The outputs are the loss module's
(`strategy.model`): one ModelOutput per micro-batch on the last stage, none elsewhere.

Schedules, with p stages and m micro-batches: GPipe runs every forward, then every backward (all m micro-batches'
activations held at once); 1F1B alternates one forward and one backward in its steady state (at most p in
flight); both leave the pipeline idle for a fraction (p - 1) / (m + p - 1) of the step. Interleaved 1F1B gives
each rank v smaller stages, cutting that bubble to about (p - 1) / (v·m + p - 1) for v times the messages.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from raytrainer.config import Config
from raytrainer.model.attention import build_mask
from raytrainer.model.loss import compute_loss, token_ce
from raytrainer.model.transformer import ModelOutput, Transformer
from raytrainer.train.strategy import Strategy

log = logging.getLogger("raytrainer.train")


def stage_layers(n_layers: int, n_stages: int, stage: int) -> range:
    """The layers stage `stage` of `n_stages` holds (equal depths: the config checks they divide)."""
    depth = n_layers // n_stages
    return range(stage * depth, (stage + 1) * depth)


def rank_stages(pp: int, stages_per_rank: int, pp_rank: int) -> list[int]:
    """Looped placement: rank r holds stages r, r + pp, r + 2pp, ... (what the interleaved schedule expects)."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


class PipelinePart(Transformer):
    """This rank's stages of the model as one module under the whole model's parameter names: what the optimizer,
    EMA and checkpoints see. It is not called; its stages are."""

    def __init__(self, model: Transformer, stages: list[int], n_stages: int):
        nn.Module.__init__(self)
        self.cfg = model.cfg
        self.width_mult = model.width_mult
        self.token_loss_sums = model.token_loss_sums
        self.rotary_emb = model.rotary_emb
        if 0 in stages:
            self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleDict({str(i): model.layers[i] for s in stages
                                     for i in stage_layers(model.cfg.n_layers, n_stages, s)})
        if n_stages - 1 in stages:
            self.norm = model.norm
            self.lm_head = model.lm_head
        self.mtp = nn.ModuleList()

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline's part of the model is run stage by stage by its schedule "
                           "(PipelineStrategy.pipeline), not called whole")


class Stage(nn.Module):
    """One stage: its layers, plus the embedding (first stage) or the final norm and lm_head (last), and the
    rotary tables every stage needs. The first stage takes token ids, the others the hidden states before them;
    every stage is given the micro-batch's positions and document ids."""

    def __init__(self, part: PipelinePart, layers: range, first: bool, last: bool):
        super().__init__()
        self.cfg = part.cfg
        self.embed_tokens = part.embed_tokens if first else None
        self.rotary_emb = part.rotary_emb
        self.layers = nn.ModuleDict({str(i): part.layers[str(i)] for i in layers})
        self.norm = part.norm if last else None
        self.lm_head = part.lm_head if last else None
        self._logits = part.output_logits  # a bound method: not registered, the part's own lm_head

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        cos, sin = self.rotary_emb(position_ids)
        mask = build_mask(doc_ids, self.cfg.attention, x.device, causal=not self.cfg.bidirectional)
        for layer in self.layers.values():
            x = layer(x, cos, sin, mask)
        if self.lm_head is None:
            return x
        return self._logits(self.norm(x))


class PipelineLoss(nn.Module):
    """The loss at the pipeline's end, one micro-batch at a time (what fault injection hooks, as it hooks the
    model elsewhere): the same terms as Transformer.forward computes from the same logits."""

    def __init__(self, part: PipelinePart):
        super().__init__()
        self.cfg = part.cfg
        self._sums = part.token_loss_sums
        self.loss_normalizer: float | None = None
        self.token_losses = False

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        loss, metrics = compute_loss(logits, labels, label_smoothing=self.cfg.loss.label_smoothing,
                                     z_loss_weight=self.cfg.loss.z_loss_weight, loss_normalizer=self.loss_normalizer,
                                     sums=self._sums)
        if self.token_losses and "token_ce" not in metrics:
            metrics["token_ce"] = token_ce(logits.detach(), labels)
        return ModelOutput(None, loss, metrics)


class Pipeline:
    """This rank's stages and the schedule that runs a step's micro-batches through every pipeline rank."""

    def __init__(self, cfg: Config, part: PipelinePart, stages: list[int], n_stages: int, pp_group: dist.ProcessGroup,
                 device: torch.device, loss: PipelineLoss):
        self.cfg = cfg
        self.stage_ids = stages
        self.n_stages = n_stages
        self.group = pp_group
        self.device = device
        self.loss = loss
        self.modules = [Stage(part, stage_layers(cfg.model.n_layers, n_stages, s), s == 0, s == n_stages - 1)
                        for s in stages]
        self.is_last = n_stages - 1 in stages
        self._schedules: dict[tuple[int, bool], object] = {}
        self._outputs: list[ModelOutput] = []
        self._scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
        # Time inside this rank's blocks (forwards, and their recomputation under activation checkpointing): the
        # same work on every rank, so a straggler shows whichever stage it holds; the waits between stages do not.
        self.block_seconds = 0.0
        for module in self.modules:
            for block in module.layers.values():
                block.register_forward_pre_hook(self._block_start)
                block.register_forward_hook(self._block_end)
        self._t0 = 0.0

    def _block_start(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _block_end(self, module, args, output) -> None:
        self.block_seconds += time.perf_counter() - self._t0

    def _loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.loss(logits, labels)
        self._outputs.append(out)
        return self._scale(out.loss)

    def schedule(self, n_microbatches: int, train: bool):
        """The schedule for this many micro-batches, training or forwards only: each with stages of its own, as
        a stage's buffers are sized by the micro-batch count (which a curriculum phase or a resize changes)."""
        key = (n_microbatches, train)
        if key not in self._schedules:
            from torch.distributed.pipelining import (
                PipelineStage,
                Schedule1F1B,
                ScheduleGPipe,
                ScheduleInterleaved1F1B,
            )

            stages = [PipelineStage(module, s, self.n_stages, self.device, group=self.group)
                      for module, s in zip(self.modules, self.stage_ids, strict=True)]
            kind = self.cfg.parallel.pp_schedule
            loss_fn = self._loss_fn
            if kind == "interleaved_1f1b":
                schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
            elif kind == "1f1b":
                schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
            else:
                schedule = ScheduleGPipe(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
            self._schedules[key] = schedule
        return self._schedules[key]

    def _run(self, micro_batches: list[dict], train: bool) -> list[ModelOutput]:
        # The stages' buffers are sized by the first micro-batch: a short one (the end of a rank's share, a padding
        # micro-batch) is filled up with rows that have no target.
        rows = max(mb["input_ids"].shape[0] for mb in micro_batches)
        whole = {k: torch.cat([_fill(mb, k, rows) for mb in micro_batches]).to(self.device)
                 for k in ("input_ids", "labels", "position_ids", "doc_ids") if micro_batches[0].get(k) is not None}
        if "position_ids" not in whole:
            B, T = whole["input_ids"].shape
            whole["position_ids"] = torch.arange(T, device=self.device).expand(B, T).contiguous()
        kwargs = {k: whole[k] for k in ("position_ids", "doc_ids") if k in whole}
        args = (whole["input_ids"],) if 0 in self.stage_ids else ()
        target = whole["labels"] if self.is_last else None
        schedule = self.schedule(len(micro_batches), train)
        self._outputs = []
        if train:
            schedule.step(*args, target=target, losses=[] if self.is_last else None, return_outputs=False, **kwargs)
        else:
            schedule.eval(*args, target=target, losses=[] if self.is_last else None, **kwargs)
        # A new schedule's first step infers its stages' shapes by calling the loss once more, before the real
        # micro-batches: only the last len(micro_batches) calls are the step's.
        outputs, self._outputs = self._outputs[-len(micro_batches):] if self.is_last else [], []
        for out, mb in zip(outputs, micro_batches if outputs else [], strict=True):
            if "token_ce" in out.metrics:  # the rows it was given, not those it was filled up with
                out.metrics["token_ce"] = out.metrics["token_ce"][:mb["input_ids"].shape[0]]
        return outputs

    def train(self, micro_batches: list[dict], loss_normalizer: float,
              scale: Callable[[torch.Tensor], torch.Tensor], token_losses: bool = False) -> list[ModelOutput]:
        """Every micro-batch forwards and backwards through the pipeline, the gradients reduced over the replicas
        after the last backward. Each micro-batch's loss is its summed token loss over `loss_normalizer`, as in
        the step engine; `scale` is applied to it before the backward (the fp16 loss scale)."""
        self.loss.loss_normalizer, self.loss.token_losses, self._scale = loss_normalizer, token_losses, scale
        return self._run(micro_batches, train=True)

    def evaluate(self, micro_batches: list[dict]) -> list[ModelOutput]:
        """Forwards only; each output's loss is its micro-batch's mean (normaliser: its own label tokens)."""
        self.loss.loss_normalizer, self.loss.token_losses = None, False
        with torch.no_grad():
            return self._run(micro_batches, train=False)


def _fill(mb: dict, key: str, rows: int) -> torch.Tensor:
    """mb[key] with rows added up to `rows`: no target, positions from 0, one document."""
    value = mb[key]
    missing = rows - value.shape[0]
    if missing == 0:
        return value
    T = value.shape[1]
    fill = {"labels": torch.full((missing, T), -100, dtype=value.dtype),
            "position_ids": torch.arange(T, dtype=value.dtype).expand(missing, T)}.get(key)
    if fill is None:  # tokens and document ids: zeros
        fill = torch.zeros((missing, T), dtype=value.dtype)
    return torch.cat([value, fill.to(value.device)])


class PipelineStrategy(Strategy):
    """Pipeline parallel over mesh["pp"]; over mesh["dp"] either plain data parallel (parallel.strategy=ddp:
    gradients averaged after the schedule) or FSDP2 (fsdp: every stage sharded, tensor parallel allowed)."""

    @property
    def name(self) -> str:
        return self.cfg.parallel.strategy

    def __init__(self, cfg: Config, module: nn.Module, rank: int, world_size: int, device: torch.device,
                 mesh: DeviceMesh):
        self.mesh = mesh
        p = cfg.parallel
        n_stages = p.pp * p.pp_stages_per_rank
        self._stages = rank_stages(p.pp, p.pp_stages_per_rank, mesh["pp"].get_local_rank())
        self._n_stages = n_stages
        super().__init__(cfg, PipelinePart(module, self._stages, n_stages), rank, world_size, device)

    def wrap(self, module: nn.Module) -> nn.Module:
        self.loss_module = PipelineLoss(module)
        self.pipeline = Pipeline(self.cfg, module, self._stages, self._n_stages, self.mesh["pp"].get_group(),
                                 self.device, self.loss_module)
        if self.sharded:  # each stage is an FSDP2 root over the replicas; the schedule reduce-scatters at its end
            from raytrainer.train.parallelize import apply_fsdp

            for stage in self.pipeline.modules:
                apply_fsdp(stage, self.cfg, self.mesh["dp"])
        return self.loss_module

    @property
    def sharded(self) -> bool:
        return self.cfg.parallel.strategy == "fsdp"

    def finish_gradients(self) -> None:
        """Without FSDP: the replicas' gradients averaged, once every micro-batch's backward has run, by one
        all-reduce of this rank's gradients flattened together. (DDP's reducer, which would overlap it with the
        backward, cannot follow a schedule that runs each stage's backward in pieces.)"""
        dp = self.mesh["dp"]
        if dp.size() == 1 or self.sharded:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=dp.get_group())
        flat /= dp.size()
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """The norm over every stage's gradients: each rank's squared norm summed over the pipeline."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        local = (torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True) if params
                 else torch.zeros((), device=self.device))
        if hasattr(local, "full_tensor"):  # FSDP (and tensor parallel): the stage's norm over its shards
            local = local.full_tensor()
        squared = local.double().square().reshape(1).to(self._comm_device())
        dist.all_reduce(squared, group=self.mesh["pp"].get_group())
        value = math.sqrt(float(squared.item()))
        if max_norm is not None and math.isfinite(value) and value > max_norm and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(value), foreach=True)
        return value

"""The one place a model is parallelised. The model's code knows nothing of it.

In this order (each step sees what the one before left):

    parallelize(model, cfg, mesh, expert_mesh)
                                       tensor + sequence parallel over mesh["tp"], context parallel over
                                       mesh["cp"] (raytrainer.train.context_parallel), expert parallel over
                                       expert_mesh["ep"] (raytrainer.train.expert_parallel), activation
                                       checkpointing, fp8 linears, torch.compile per block
    apply_fsdp(model, cfg, mesh)       FSDP2 over mesh["dp"] (the strategies call it, or apply_ddp)

Tensor parallel (Megatron's layout, with DTensor): attention's q/k/v and the MLP's gate/up are split by
output features (each rank holds n_heads/tp heads and hidden/tp MLP units), o_proj and down_proj by input
features, so one block costs two reductions forward and two backward. Sequence parallel: between those,
the residual stream and the norms are split along the sequence, each reduction a reduce-scatter and each
entry into attention or the MLP an all-gather, so no rank holds a whole row's activations outside them.
The embedding is split by vocabulary, lm_head by vocabulary too, and the logits stay split: the loss is
computed on each rank's slice (raytrainer.train.vocab_parallel_loss), so no rank holds a whole row of logits.
A forward without labels returns this rank's slice of the logits.

Parameter names do not change, so checkpoints, EMA and exports read the same keys; DCP stores tensor-parallel
shards by their global offsets, so a checkpoint saved on one mesh loads on another.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from raytrainer.config import Config
from raytrainer.train.vocab_parallel_loss import vocab_parallel_loss_sums

log = logging.getLogger("raytrainer.train")


def parallelize(model: nn.Module, cfg: Config, mesh: DeviceMesh | None = None,
                expert_mesh: DeviceMesh | None = None) -> nn.Module:
    """Tensor parallel (when mesh["tp"] has more than one rank), expert parallel (expert_mesh["ep"]),
    activation checkpointing, fp8, compile."""
    from raytrainer.model.checkpointing import apply_activation_checkpointing

    if mesh is not None and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if mesh is not None and mesh["cp"].size() > 1:
        from raytrainer.train.context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh["cp"])
    if expert_mesh is not None:
        from raytrainer.train.expert_parallel import shard_experts

        shard_experts(model, expert_mesh["ep"])
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.precision.dtype == "fp8":
        from raytrainer.train.precision import enable_fp8

        model = enable_fp8(model)
    if cfg.train.compile:
        # Block by block (as torchtitan does): every block shares one compiled graph, the module tree
        # and parameter names stay as they are, and FSDP2 can still shard and prefetch per block.
        for block in getattr(model, "layers", [model]):
            block.compile()
    return model


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    # The gathered logits are a view of DTensor's buffer, which FSDP's root warns about on every rank; nothing
    # downstream writes into them.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    tied = model.lm_head.weight is model.embed_tokens.weight
    parallelize_module(model, tp_mesh, {
        # tokens in whole; out: each rank's slice of the sequence (the embedding rows are split by vocabulary)
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # the whole sequence in, this rank's slice of the vocabulary out, never gathered: the loss is split too
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1)),
    })
    if tied:  # both split by vocabulary rows (Shard(0)): one parameter again
        model.lm_head.weight = model.embed_tokens.weight
    vocab_slice = model.cfg.vocab_size // tp_mesh.size()
    model.token_loss_sums = functools.partial(vocab_parallel_loss_sums, group=tp_mesh.get_group(),
                                              vocab_start=tp_mesh.get_local_rank() * vocab_slice,
                                              vocab_size=model.cfg.vocab_size)
    model.loss_chunk_tokens = 0  # the vocabulary-parallel loss over each rank's slice of the logits instead
    for block in model.layers:
        plan = {
            "input_layernorm": SequenceParallel(),
            # (x, cos, sin, mask, cache): only x is split; the sequence gathered whole for attention
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None)),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.self_attn.q_norm is not None:
            # QK-norm normalises each head on its own: a rank's heads (dim 2 of [B, T, heads, head_dim]) in, its
            # gain replicated, so the gain's gradient is summed over every rank's heads
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)


def apply_fsdp(model: nn.Module, cfg: Config, dp_mesh: DeviceMesh) -> nn.Module:
    """FSDP2: every block, then the root (embeddings, final norm, lm_head, MTP heads), sharded over dp_mesh. The
    root may be a pipeline stage (raytrainer.train.pipeline)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from raytrainer.train.fsdp import mixed_precision_policy

    p = cfg.parallel
    on_cuda = dp_mesh.device_type == "cuda"
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=on_cuda) if p.fsdp_cpu_offload else OffloadPolicy()
    settings = dict(mesh=dp_mesh, mp_policy=mixed_precision_policy(cfg.precision.dtype),
                    offload_policy=offload, reshard_after_forward=p.fsdp_reshard_after_forward)
    # a pipeline stage keeps its blocks under their whole-model numbers (a ModuleDict)
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        fully_shard(block, **settings)
    # FSDP keeps the root unsharded between forward and backward anyway: backward needs it immediately.
    fully_shard(model, **settings)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    # Expert-parallel experts differ between ranks: their gradients are summed by the strategy, not averaged here
    experts = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
    ids = [device.index] if device.type == "cuda" else None
    # The model's buffers are constants (RoPE tables), identical on every rank by construction: a
    # broadcast of them before every forward would only make each forward wait on the slowest rank.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

"""Causal self-attention, optionally masked to documents, over interchangeable backends.

Token i may attend to token j iff j <= i and doc_ids[i] == doc_ids[j] (doc_ids=None: one document).

Backends:
- sdpa:  F.scaled_dot_product_attention; is_causal=True without documents, otherwise an explicit
         boolean [B, 1, T, T] mask (fine on CPU and for short rows; memory grows with T^2).
- flex:  FlexAttention with a block mask built from doc_ids; CUDA only (no backward on CPU in torch 2.13).
- flash: flash-attn's varlen kernel, each document its own sequence; CUDA, fp16/bf16, needs `flash-attn`.
- auto:  sdpa on CPU and for plain causal attention, flex for documents on CUDA.

The mask depends only on doc_ids, so the model builds it once per forward with `build_mask` and hands
it to every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash")


@dataclass
class AttentionMask:
    """What one backend needs to apply document masking, built once per batch."""

    backend: str  # resolved: sdpa | flex | flash
    causal: bool = True  # False: bidirectional within each document (masked language modelling)
    dense: torch.Tensor | None = None  # sdpa: [B, 1, T, T] bool, True = may attend
    block_mask: Any = None  # flex: torch.nn.attention.flex_attention.BlockMask
    cu_seqlens: torch.Tensor | None = None  # flash: int32 [num_docs + 1] offsets into the flattened rows
    max_seqlen: int = 0
    doc_ids: torch.Tensor | None = None  # [B, T], what it was built from (None: one document per row)


@functools.cache
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, has_documents: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"model.attention={backend!r} is not a backend; choose one of {BACKENDS}")
    if backend == "auto":
        return "flex" if device.type == "cuda" and has_documents else "sdpa"
    if backend in ("flex", "flash") and device.type != "cuda":
        raise ValueError(
            f"model.attention={backend} needs a CUDA device, but the tensors are on {device}: "
            + ("FlexAttention has no backward pass on CPU in torch 2.13; " if backend == "flex" else "")
            + "use model.attention=auto or sdpa"
        )
    if backend == "flash" and not flash_attn_available():
        raise ValueError("model.attention=flash needs the flash-attn package (pip install flash-attn); "
                         "or use model.attention=auto (FlexAttention)")
    return backend


def build_mask(doc_ids: torch.Tensor | None, backend: str = "auto", device: torch.device | None = None,
               causal: bool = True) -> AttentionMask:
    """The document mask for `attention`; doc_ids [B, T] int or None (one document per row). `causal=False`:
    each token sees its whole document."""
    device = device or (doc_ids.device if doc_ids is not None else torch.device("cpu"))
    backend = resolve_backend(backend, device, doc_ids is not None)
    if doc_ids is None:
        return AttentionMask(backend, causal)  # each backend has a built-in flag or a cached mask
    doc_ids = doc_ids.to(device)
    B, T = doc_ids.shape
    if backend == "sdpa":
        return AttentionMask(backend, causal, dense=dense_document_mask(doc_ids, causal), doc_ids=doc_ids)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask = create_block_mask(document_mask_mod(doc_ids, causal), B, None, T, T, device=device,
                                       _compile=device.type == "cuda")
        return AttentionMask(backend, causal, block_mask=block_mask, doc_ids=doc_ids)
    cu_seqlens, max_seqlen = varlen_offsets(doc_ids)
    return AttentionMask(backend, causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, doc_ids=doc_ids)


def dense_document_mask(doc_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """[B, 1, T, T] bool: same document (and, if causal, not after the query)."""
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    if causal:
        T = doc_ids.shape[1]
        same = same & torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return same[:, None]


def document_mask_mod(doc_ids: torch.Tensor, causal: bool = True):
    """FlexAttention mask_mod: same document (and, if causal, not after the query)."""

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc_ids[b, q_idx] == doc_ids[b, kv_idx]
        return (q_idx >= kv_idx) & same if causal else same

    return mask_mod


def varlen_offsets(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn varlen layout of the flattened rows: int32 cu_seqlens [num_docs + 1] and the longest
    document. A sequence starts at every row start and wherever the document id changes."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
    mask: AttentionMask | None = None,
) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, H_kv, T, D] with H_kv dividing H (GQA). Returns [B, H, T, D].

    scale defaults to 1/sqrt(D). Pass `mask` (from build_mask) to reuse one mask across layers;
    otherwise it is built here from doc_ids and backend.
    """
    if mask is None:
        mask = build_mask(doc_ids, backend, q.device)
    gqa = k.shape[1] != q.shape[1]
    if mask.backend == "flash":
        return _flash_attention(q, k, v, mask, scale)
    if mask.backend == "flex":
        block_mask = mask.block_mask
        if block_mask is None and mask.causal:
            block_mask = _causal_block_mask(q.shape[2], q.device)
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    if mask.dense is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale, enable_gqa=gqa)


# --------------------------------------------------------------------------- flex


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # uncompiled FlexAttention materialises the full score matrix; compiled it is a fused kernel
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, None, None, T, T, device=device)


# --------------------------------------------------------------------------- flash-attn


def _flash_attention(q, k, v, mask: AttentionMask, scale: float | None) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"model.attention=flash needs fp16/bf16 activations, got {q.dtype}; "
                         "use precision.dtype=bf16 or model.attention=auto")
    B, H, T, D = q.shape
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn wants [B, T, heads, D]
    if mask.cu_seqlens is None:
        out = flash_attn_func(q, k, v, softmax_scale=scale, causal=mask.causal)
    else:
        q, k, v = (x.reshape(B * T, x.shape[2], D) for x in (q, k, v))
        out = flash_attn_varlen_func(q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen,
                                     mask.max_seqlen, softmax_scale=scale, causal=mask.causal)
    return out.view(B, T, H, D).transpose(1, 2)

"""Parameter and FLOP counts from the config alone (no model is built).

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B) and torchtitan:
    6 * N_matmul + 12 * n_layers * d_model * seq_len
- N_matmul counts every weight that multiplies an activation: the blocks' projections, lm_head
  (once per prediction head, MTP heads included) and the MTP projections. Of a mixture of experts only the
  active weights count: the router, the top_k routed experts and the shared ones. The input embedding is a
  lookup, and norm gains are elementwise, so neither counts.
- The attention term is QK^T and AV (2 * 2 * T * d_model forward per token and layer, x3 for training),
  over the full T x T square: no halving for the causal mask, as in PaLM, so numbers (and MFU) compare
  with published ones. Document masking is not subtracted either.

`attended_pairs` and `attention_flops` count the attention work actually done instead: the (query, key)
pairs inside each document, l(l+1)/2 for a causal document of l tokens (l^2 bidirectional), which is what
a document-masked kernel computes; the training step's MFU uses them (raytrainer.train.metrics).
"""

from __future__ import annotations

import torch

from raytrainer.config import ModelConfig


def _block_params(cfg: ModelConfig, active: bool = False) -> tuple[int, int]:
    """(matmul weights, norm gains) of one block. `active`: of a mixture of experts, only the weights one token
    goes through (the router, its top_k experts and the shared ones), which is what its FLOPs count."""
    d, attn_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attention = d * attn_dim + 2 * d * kv_dim + attn_dim * d  # q, k, v, o
    if cfg.moe is None:
        mlp = 3 * d * cfg.hidden_dim  # gate, up, down
    else:
        experts = (cfg.moe.top_k if active else cfg.moe.n_experts) + cfg.moe.shared_experts
        mlp = 3 * d * cfg.expert_hidden_dim * experts + d * cfg.moe.n_experts  # experts + router
    norms = 2 * d + (2 * cfg.head_dim if cfg.qk_norm else 0)
    return attention + mlp, norms


def count_params(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Exact parameter count of Transformer(cfg). Without embeddings: minus embed_tokens and an untied
    lm_head (Kaplan et al.'s "non-embedding" parameters)."""
    matmul, norms = _block_params(cfg)
    n = cfg.n_layers * (matmul + norms) + cfg.d_model  # blocks + final norm
    n += cfg.mtp_heads * (cfg.d_model * cfg.d_model + cfg.d_model)  # MTP proj + norm
    if include_embeddings:
        vocab_matrices = 1 if cfg.tie_embeddings else 2
        n += vocab_matrices * cfg.vocab_size * cfg.d_model
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """Weights used in matmuls per token in training (lm_head once per prediction head; of a mixture of
    experts, the active ones)."""
    matmul, _ = _block_params(cfg, active=True)
    heads = 1 + cfg.mtp_heads
    return cfg.n_layers * matmul + heads * cfg.d_model * cfg.vocab_size + cfg.mtp_heads * cfg.d_model**2


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at the given sequence length, PaLM's convention."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params(cfg) + attention)


def attended_pairs(doc_ids: torch.Tensor | None, shape: tuple[int, int], causal: bool = True) -> int:
    """(query, key) pairs an attention layer computes for a micro-batch [B, T] under document masking:
    per document of l tokens, l(l+1)/2 causal, l^2 bidirectional (doc_ids None: each row one document)."""
    rows, seq_len = shape
    if doc_ids is None:
        lengths = torch.full((rows,), seq_len, dtype=torch.int64)
    else:
        ids = doc_ids.detach().to("cpu", torch.int64)
        # a number per (row, document), so a document never runs on into the next row
        keyed = ids + torch.arange(rows, dtype=torch.int64)[:, None] * (int(ids.max()) + 1 if ids.numel() else 1)
        lengths = torch.unique_consecutive(keyed.reshape(-1), return_counts=True)[1]
    per_doc = lengths * (lengths + 1) // 2 if causal else lengths * lengths
    return int(per_doc.sum())


def attention_flops(cfg: ModelConfig, pairs: int) -> float:
    """Training (forward + backward) FLOPs of the attention matmuls over `pairs` (query, key) pairs, every
    layer: QK^T and AV, 2 FLOPs per multiply-add, x3 for training."""
    return float(12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * pairs)


def matmul_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token of the weight matmuls alone (6N)."""
    return float(6 * matmul_params(cfg))

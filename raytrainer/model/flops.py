"""Parameter and FLOP counts from the config alone (no model is built).

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B) and torchtitan:
    6 * N_matmul + 12 * n_layers * d_model * seq_len
- N_matmul counts every weight that multiplies an activation: the blocks' projections, lm_head
  (once per prediction head, MTP heads included) and the MTP projections. The input embedding is a
  lookup, and norm gains are elementwise, so neither counts.
- The attention term is QK^T and AV (2 * 2 * T * d_model forward per token and layer, x3 for training),
  over the full T x T square: no halving for the causal mask, as in PaLM, so numbers (and MFU) compare
  with published ones. Document masking is not subtracted either.
"""

from __future__ import annotations

from raytrainer.config import ModelConfig


def _block_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul weights, norm gains) of one block."""
    d, attn_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attention = d * attn_dim + 2 * d * kv_dim + attn_dim * d  # q, k, v, o
    mlp = 3 * d * cfg.hidden_dim  # gate, up, down
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
    """Weights used in matmuls per token in training (lm_head once per prediction head)."""
    matmul, _ = _block_params(cfg)
    heads = 1 + cfg.mtp_heads
    return cfg.n_layers * matmul + heads * cfg.d_model * cfg.vocab_size + cfg.mtp_heads * cfg.d_model**2


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at the given sequence length."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params(cfg) + attention)

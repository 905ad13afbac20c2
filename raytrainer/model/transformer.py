"""A decoder-only Llama-style Transformer.

Pre-LN RMSNorm blocks, RoPE, grouped-query attention, SwiGLU MLP; optional QK-norm, logit soft-capping,
weight tying, muP and multi-token-prediction heads. Parameter names follow Hugging Face Llama
(without its `model.` prefix), so export is a rename and no tensor is permuted.

Multi-token prediction: head k (k = 1 .. mtp_heads) reads the trunk output h (the last block's
output, before the final norm) as norm_k(h + proj_k(h)) and shares lm_head; it predicts the token
k positions beyond the main target, i.e. token t+1+k at position t. These heads are training-only
and are not part of an exported Llama checkpoint.

muP (mup_base_d_model set), with width multiplier m = d_model / mup_base_d_model: hidden matrices are
initialised with std / sqrt(m) and trained with lr / m (Adam), attention uses 1/head_dim instead of
1/sqrt(head_dim), and the logits are multiplied by 1/m. Embeddings, norms and lm_head keep lr and init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raytrainer import kernels
from raytrainer.config import ModelConfig
from raytrainer.model.attention import AttentionMask, attention, build_mask
from raytrainer.model.fused_loss import chunked_loss_sums
from raytrainer.model.kv_cache import KVCache, LayerCache
from raytrainer.model.loss import combine_loss, compute_loss, shift_labels, token_loss_sums
from raytrainer.model.moe import MoE
from raytrainer.model.rope import RotaryEmbedding, apply_rope


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None in training with the chunked loss: they are never materialised
    loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()  # normalise in fp32 like HF Llama, whatever the activation dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.scale = 1.0 / cfg.head_dim if cfg.mup_base_d_model else 1.0 / math.sqrt(cfg.head_dim)
        # q, k, v -> outputs; replaced where the sequence is split over ranks (context parallel)
        self.attend = attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # heads counted from the projections' width: under tensor parallelism a rank holds a slice of them
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:  # generation: attend to every position so far
            k, v = cache.store(k, v)
        y = self.attend(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.hidden_dim
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(kernels.swiglu(gate, up) if kernels.enabled(gate) else F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.moe is not None else MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPHead(nn.Module):
    """One extra prediction depth: a residual linear map of the trunk output and its own norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.proj(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.width_mult = cfg.d_model / cfg.mup_base_d_model if cfg.mup_base_d_model else 1.0
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_heads))
        # The main head's loss sums from its logits; replaced where the logits are split (tensor parallel)
        self.token_loss_sums = token_loss_sums
        # The head and the loss a chunk of tokens at a time (0: the logits materialised); set to 0 by whatever
        # computes the loss elsewhere or keeps lm_head's weight out of reach (tensor parallel, ZeRO-3)
        self.loss_chunk_tokens = cfg.loss.tokens_per_chunk()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter and buffer, e.g. after building on the meta device."""
        std = self.cfg.init_std
        hidden_std = std / math.sqrt(self.width_mult)
        residual_std = hidden_std
        if self.cfg.depth_scaled_init:
            residual_std = hidden_std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed_tokens.weight, 0.0, std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        for layer in self.layers:
            attn = layer.self_attn
            dense = [layer.mlp] if isinstance(layer.mlp, MLP) else [m for m in [layer.mlp.shared] if m is not None]
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, *(m.gate_proj for m in dense),
                           *(m.up_proj for m in dense)):
                nn.init.normal_(linear.weight, 0.0, hidden_std)
            for linear in (attn.o_proj, *(m.down_proj for m in dense)):  # outputs added to the residual stream
                nn.init.normal_(linear.weight, 0.0, residual_std)
            if isinstance(layer.mlp, MoE):
                experts = layer.mlp.experts
                nn.init.normal_(experts.gate_proj, 0.0, hidden_std)
                nn.init.normal_(experts.up_proj, 0.0, hidden_std)
                nn.init.normal_(experts.down_proj, 0.0, residual_std)
                nn.init.normal_(layer.mlp.router.gate.weight, 0.0, std)
                layer.mlp.router.bias.zero_()
        for head in self.mtp:
            nn.init.normal_(head.proj.weight, 0.0, hidden_std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.rotary_emb.reset_parameters()

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        if self.width_mult != 1.0:
            logits = logits / self.width_mult
        if self.cfg.logit_softcap is not None:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        loss_normalizer: float | None = None,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
    ) -> ModelOutput:
        """`cache` (generation): the new positions attend to every cached one too, and are added to it;
        `valid` [B, T] marks left padding (False) among the new positions."""
        B, T = input_ids.shape
        if position_ids is None:
            start = 0 if cache is None else cache.length
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary_emb(position_ids)
        if cache is None:
            # once, shared by every layer
            mask = build_mask(doc_ids, self.cfg.attention, input_ids.device, causal=not self.cfg.bidirectional)
        else:
            if self.cfg.bidirectional:
                raise ValueError("model.bidirectional=true (masked language modelling): there is no next token to "
                                 "generate")
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
            mask = AttentionMask("sdpa", dense=cache.begin(valid))

        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask) if cache is None else layer(x, cos, sin, mask, cache.layers[i])
        if cache is not None:
            cache.end(T)
        if labels is not None and self.loss_chunk_tokens:
            return self.with_routing_terms(self.chunked_loss(x, labels, doc_ids, loss_normalizer), loss_normalizer)
        logits = self.output_logits(self.norm(x))
        if labels is None:
            return ModelOutput(logits)

        loss, metrics = compute_loss(
            logits,
            labels,
            label_smoothing=self.cfg.loss.label_smoothing,
            z_loss_weight=self.cfg.loss.z_loss_weight,
            mtp_logits=[self.output_logits(head(x)) for head in self.mtp],
            mtp_weight=self.cfg.mtp_weight,
            doc_ids=doc_ids,
            loss_normalizer=loss_normalizer,
            sums=self.token_loss_sums,
        )
        return self.with_routing_terms(ModelOutput(logits, loss, metrics), loss_normalizer)

    def with_routing_terms(self, out: ModelOutput, loss_normalizer: float | None) -> ModelOutput:
        """A mixture-of-experts model's balancing and router z-losses added to the loss (each layer's, summed
        over layers as Switch and ST-MoE do, weighted like the main loss by this micro-batch's label tokens), and
        its routing in the metrics (the terms as means per layer)."""
        stats = [m.stats for m in self.layers.modules() if isinstance(m, MoE)]
        if not stats:
            return out
        moe = self.cfg.moe
        aux = torch.stack([s.aux_loss for s in stats]).sum()
        z = torch.stack([s.z_loss for s in stats]).sum()
        labels = out.metrics["label_tokens"]
        weight = labels / (loss_normalizer if loss_normalizer is not None else labels.clamp(min=1))
        out.loss = out.loss + weight * (moe.aux_loss_weight * aux + moe.router_z_loss_weight * z)
        load = torch.stack([s.load for s in stats])
        out.metrics.update(moe_aux_loss=aux.detach() / len(stats), moe_z_loss=z.detach() / len(stats), moe_load=load,
                           moe_dropped=torch.stack([s.dropped for s in stats]).sum())
        return out

    def chunked_loss(self, x: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None,
                     loss_normalizer: float | None) -> ModelOutput:
        """The loss through raytrainer.model.fused_loss: the head and the loss a chunk of tokens at a time.
        Every token's CE comes along in metrics["token_ce"] (what per-document blame reads)."""
        loss_cfg = self.cfg.loss

        def sums(h: torch.Tensor, target: torch.Tensor, z_weight: float):
            return chunked_loss_sums(h, self.lm_head.weight, target, chunk_tokens=self.loss_chunk_tokens,
                                     scale=1.0 / self.width_mult, softcap=self.cfg.logit_softcap,
                                     label_smoothing=loss_cfg.label_smoothing, z_loss_weight=z_weight)

        main, token_ce = sums(self.norm(x), labels, loss_cfg.z_loss_weight)
        mtp = [sums(head(x), shift_labels(labels, doc_ids, k), 0.0)[0] for k, head in enumerate(self.mtp, start=1)]
        loss, metrics = combine_loss(main, mtp, z_loss_weight=loss_cfg.z_loss_weight, mtp_weight=self.cfg.mtp_weight,
                                     loss_normalizer=loss_normalizer)
        metrics["token_ce"] = token_ce
        return ModelOutput(None, loss, metrics)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Param groups with `lr_scale`: hidden matrices get 1/m under muP (Adam rule), the rest 1.0.
        Embeddings, norm gains and biases are not decayed; lm_head is (when untied)."""
        buckets: dict[str, list[nn.Parameter]] = {"hidden": [], "output": [], "embeddings": [], "norms": []}
        for name, p in self.named_parameters():  # a tied lm_head appears once, as embed_tokens
            if not p.requires_grad:
                continue
            if name.endswith("embed_tokens.weight"):
                buckets["embeddings"].append(p)
            elif name.endswith("lm_head.weight"):
                buckets["output"].append(p)
            elif p.ndim < 2:
                buckets["norms"].append(p)
            else:
                buckets["hidden"].append(p)
        settings = {
            "hidden": (weight_decay, 1.0 / self.width_mult),
            "output": (weight_decay, 1.0),
            "embeddings": (0.0, 1.0),
            "norms": (0.0, 1.0),
        }
        return [
            {"name": name, "params": params, "weight_decay": settings[name][0], "lr_scale": settings[name][1]}
            for name, params in buckets.items()
            if params
        ]

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

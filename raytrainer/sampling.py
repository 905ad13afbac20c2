"""Text out of a model: batched sampling (greedy, temperature, top-k, top-p, min-p, repetition penalty) and
beam search, both over a KV cache, so every new token runs through the model once.

Prompts of different lengths are left-padded; each row keeps its own positions, and stops at EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytrainer.model.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None  # keep the k likeliest tokens
    top_p: float | None = None  # keep the likeliest tokens whose probabilities sum to p
    min_p: float | None = None  # keep tokens at least min_p times as likely as the likeliest
    repetition_penalty: float = 1.0  # > 1: tokens already in the text are less likely (CTRL's rule)
    num_beams: int = 1  # > 1: beam search (deterministic; the sampling settings above are not used)
    length_penalty: float = 1.0  # beam search: a finished beam's score is its log-probability / length**this
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
                  (self.temperature >= 0, "temperature must be >= 0 (0: greedy)"),
                  (self.top_k is None or self.top_k >= 1, "top_k must be at least 1"),
                  (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.num_beams >= 1, "num_beams must be at least 1")]
        wrong = [message for ok, message in checks if not ok]
        if wrong:
            raise ValueError("; ".join(wrong))


def penalise_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens already seen ([B, V] bool) get their logit divided by `penalty` when positive, multiplied when
    negative: less likely either way."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: what is filtered out gets -inf."""
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None and s.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the likelier tokens
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= s.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    if s.min_p is not None and s.min_p > 0:
        floor = s.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            valid[row, width - len(prompt):] = True
    return ids, valid


def _room(model, prompts: list[list[int]], s: Sampling) -> int:
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    limit = model.cfg.max_seq_len
    if longest >= limit:
        raise ValueError(f"a prompt of {longest} tokens leaves no room under model.max_seq_len={limit}")
    return min(s.max_new_tokens, limit - longest)


@torch.no_grad()
def sample(model, prompts: list[list[int]], s: Sampling, eos_id: int | None, pad_id: int) -> list[list[int]]:
    """The new tokens of each prompt (up to and including EOS)."""
    if s.num_beams > 1:
        return [beam_search(model, p, s, eos_id, pad_id) for p in prompts]
    device = next(model.parameters()).device
    new_tokens = _room(model, prompts, s)
    ids, valid = left_pad(prompts, pad_id, device)
    B, width = ids.shape
    cache = KVCache(model.cfg, B, width + new_tokens, device, next(model.parameters()).dtype)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    logits = model(ids, position_ids=positions, cache=cache, valid=valid).logits[:, -1].float()
    next_position = valid.sum(1, keepdim=True)
    # Left padding: every row's last prompt token is real, so pad slots can name it instead.
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, torch.where(valid, ids, ids[:, -1:]), True)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    for _ in range(new_tokens):
        logits = penalise_repetition(logits, seen, s.repetition_penalty)
        if s.temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(logits, s), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
        if eos_id is not None:
            done |= token == eos_id
        if bool(done.all()):
            break
        seen.scatter_(1, token[:, None], ~done[:, None])
        logits = model(token[:, None], position_ids=next_position, cache=cache).logits[:, -1].float()
        next_position = next_position + 1
    return out


@torch.no_grad()
def beam_search(model, prompt: list[int], s: Sampling, eos_id: int | None, pad_id: int) -> list[int]:
    """The new tokens of the likeliest continuation `num_beams` beams find (finished beams scored by log-probability
    / length**length_penalty, their length counted in new tokens)."""
    device = next(model.parameters()).device
    new_tokens = _room(model, [prompt], s)
    K = s.num_beams
    ids = torch.tensor([prompt] * K, dtype=torch.long, device=device)
    cache = KVCache(model.cfg, K, len(prompt) + new_tokens, device, next(model.parameters()).dtype)
    logits = model(ids, cache=cache).logits[:, -1].float()
    scores = torch.full((K,), float("-inf"), device=device)
    scores[0] = 0.0  # the beams start identical: expand one
    beams: list[list[int]] = [[] for _ in range(K)]
    finished: list[tuple[float, list[int]]] = []
    for step in range(new_tokens):
        total = scores[:, None] + torch.log_softmax(logits, dim=-1)
        values, flat = total.flatten().topk(2 * K)
        parents, tokens, kept = [], [], []
        for value, index in zip(values.tolist(), flat.tolist(), strict=True):
            parent, token = divmod(index, total.shape[1])
            if value == float("-inf"):
                break
            if eos_id is not None and token == eos_id:
                done = beams[parent] + [token]
                finished.append((value / len(done) ** s.length_penalty, done))
                continue
            parents.append(parent)
            tokens.append(token)
            kept.append(value)
            if len(kept) == K:
                break
        best_open = max(kept, default=float("-inf")) / (step + 1) ** s.length_penalty
        if len(finished) >= K and max(f[0] for f in finished) >= best_open or not kept:
            break
        index = torch.tensor(parents, device=device)
        cache.reorder(torch.cat([index, index[:1].repeat(K - len(parents))]) if len(parents) < K else index)
        beams = [beams[p] + [t] for p, t in zip(parents, tokens, strict=True)]
        beams += [list(beams[0]) for _ in range(K - len(beams))]
        scores = torch.tensor(kept + [float("-inf")] * (K - len(kept)), device=device)
        step_tokens = torch.tensor(tokens + [tokens[0]] * (K - len(tokens)), device=device)
        logits = model(step_tokens[:, None], cache=cache).logits[:, -1].float()
    finished += [(score / max(1, len(beam)) ** s.length_penalty, beam)
                 for score, beam in zip(scores.tolist(), beams, strict=True) if score != float("-inf")]
    return max(finished, key=lambda f: f[0])[1]

"""raytrainer's Transformer vs transformers' LlamaForCausalLM: training tokens/s at the same shapes, side by side.

Both models are built in this process from one config (the peer offline, from its config: nothing is
downloaded) and start from the same weights (the export mapping, raytrainer.hf.architecture), so their first
losses must agree; then each trains with the same AdamW loop on the same random batches, in interleaved
repeats (ours, theirs, ours, ...), and the median ratio of tokens/s is reported: ours as built by default
(model.loss.chunk_tokens=auto: lm_head and the loss 1,024 tokens at a time, the logits never whole), and ours
with the logits materialised (model.loss.chunk_tokens=0), both against the same peer. Shapes: the one of the
original comparison (d_model 256, 4 layers, 4 heads, ffn 688, vocab 8192, seq 512, batch 8) and a GQA one
(8 heads, 2 kv heads). fp32, 2 threads, on the CPU. Writes bench/results/peer_model.json.

--profile adds, per shape, where each model's training step spends its time: torch.profiler's self CPU time
per operator over the same steps, the two models side by side, the operators that differ most first.

    .venv/bin/python bench/peer_model.py [--repeats 9] [--steps 3] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from raytrainer.config import ModelConfig  # noqa: E402
from raytrainer.hf.architecture import hf_config, hf_state_dict  # noqa: E402
from raytrainer.model import Transformer  # noqa: E402

SHAPES = {
    "mha": {"vocab_size": 8192, "d_model": 256, "n_layers": 4, "n_heads": 4, "ffn_hidden": 688, "max_seq_len": 512},
    "gqa": {"vocab_size": 8192, "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "ffn_hidden": 688,
            "max_seq_len": 512},
}
SEQ, BATCH = 512, 8


def build(shape: dict, chunk_tokens: int | str = "auto") -> tuple[torch.nn.Module, torch.nn.Module, ModelConfig]:
    """Ours (with this model.loss.chunk_tokens) and the peer, from the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig(**shape, qk_norm=False, loss={"chunk_tokens": chunk_tokens})
    torch.manual_seed(0)
    ours = Transformer(cfg)
    config = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "dtype")}
    theirs = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa"))
    theirs.load_state_dict(hf_state_dict(ours.state_dict(), cfg.tie_embeddings), strict=False)
    return ours, theirs, cfg


def loss_of(model: torch.nn.Module, ids: torch.Tensor, ours: bool) -> torch.Tensor:
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    if ours:
        return model(ids, labels=labels).loss
    # HF shifts the labels itself: hand it the inputs as labels, so both predict the same next tokens.
    return model(input_ids=ids, labels=ids).loss


def train(model: torch.nn.Module, batches: list[torch.Tensor], ours: bool) -> float:
    """Tokens/s over the batches, one AdamW step each."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    for ids in batches:
        loss_of(model, ids, ours).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(b.numel() for b in batches) / (time.perf_counter() - t0)


def profile(model: torch.nn.Module, batches: list[torch.Tensor], ours: bool) -> dict[str, float]:
    """Self CPU milliseconds per operator over `batches` training steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train(model, batches, ours)
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def profile_table(ours: dict[str, float], theirs: dict[str, float], rows: int = 14) -> list[dict]:
    """The operators whose time differs most between the two models (ms over the profiled steps)."""
    ops = sorted(set(ours) | set(theirs), key=lambda op: -abs(ours.get(op, 0.0) - theirs.get(op, 0.0)))
    return [{"op": op, "ours_ms": round(ours.get(op, 0.0), 1), "theirs_ms": round(theirs.get(op, 0.0), 1)}
            for op in ops[:rows]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    parser.add_argument("--profile", action="store_true", help="self CPU time per operator, side by side")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {}
    for name, shape in SHAPES.items():
        ours, theirs, cfg = build(shape)
        materialised, _, _ = build(shape, 0)
        models = {"ours": (ours, True), "ours_logits": (materialised, True), "theirs": (theirs, False)}
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen) for _ in range(args.steps)]
        with torch.no_grad():
            first = {k: float(loss_of(m, batches[0], is_ours)) for k, (m, is_ours) in models.items()}
        for model, is_ours in models.values():  # warm up (allocator, threads)
            train(model, batches[:1], is_ours)
        rates = {k: [] for k in models}
        names = list(models)
        for r in range(args.repeats):
            # each model first in turn: no place in the order favoured
            for k in names[r % len(names):] + names[:r % len(names)]:
                model, is_ours = models[k]
                rates[k].append(train(model, batches, is_ours))
        row = {"shape": shape, "seq": SEQ, "batch": BATCH, "first_loss": first,
               "same_first_loss": all(abs(v - first["theirs"]) < 1e-4 * abs(first["theirs"]) for v in first.values()),
               "tokens_per_s": {k: round(statistics.median(v)) for k, v in rates.items()}}
        for k in ("ours", "ours_logits"):
            ratios = [a / b for a, b in zip(rates[k], rates["theirs"], strict=True)]
            row[k] = {"ratios": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3)}
        result[name] = row
        print(f"{name}: ours/theirs tokens/s {row['ours']['median_ratio']} (median of {args.repeats}: "
              f"{row['ours']['ratios']}), with the logits materialised {row['ours_logits']['median_ratio']} "
              f"({row['ours_logits']['ratios']}); first losses {first}", flush=True)
        if args.profile:
            ours_ops, theirs_ops = profile(ours, batches, True), profile(theirs, batches, False)
            table = profile_table(ours_ops, theirs_ops)
            row["profile_ms"] = {"ours_total": round(sum(ours_ops.values()), 1),
                                 "theirs_total": round(sum(theirs_ops.values()), 1), "ops": table}
            print(f"  self CPU ms over {len(batches)} steps: ours {row['profile_ms']['ours_total']}, "
                  f"theirs {row['profile_ms']['theirs_total']}; largest differences:")
            for op in table:
                print(f"    {op['op']:<60} {op['ours_ms']:>9} {op['theirs_ms']:>9}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peer_model.json").write_text(json.dumps(result, indent=2))
    print("peer_model: " + ", ".join(f"{k} {v['ours']['median_ratio']} (logits materialised "
                                     f"{v['ours_logits']['median_ratio']})" for k, v in result.items()))


if __name__ == "__main__":
    main()

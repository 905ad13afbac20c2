"""Guardian overhead: the per-step actor round trip from rank 0, against the tiny model's step time.

A Ray actor plays rank 0 of the `tiny` preset on one worker: it runs real training steps (forward + backward
over the global batch's micro-batches, AdamW step) and asks the guardian actor for a decision after each one,
exactly as the loop does. Measured: the round trip inside those steps, a burst of back-to-back round trips
(a steadier median), and the step itself. The overhead is median round trip / median step time.

    .venv/bin/python bench/guardian_overhead.py [--steps 30] [--calls 2000]

Last line: `guardian_overhead_pct: <value>`; JSON in bench/results/guardian_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def build_model(cfg):
    """raytrainer's Transformer when it is importable; otherwise a Llama-shaped stand-in of the same size."""
    import torch.nn.functional as F
    from torch import nn

    try:
        from raytrainer.model import Transformer

        return Transformer(cfg.model), "raytrainer.model.Transformer"
    except ImportError:
        pass

    m = cfg.model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_heads, self.kv_heads, self.head_dim = m.n_heads, m.kv_heads, m.head_dim
            self.attn_norm, self.mlp_norm = nn.RMSNorm(m.d_model), nn.RMSNorm(m.d_model)
            self.q = nn.Linear(m.d_model, m.n_heads * m.head_dim, bias=False)
            self.kv = nn.Linear(m.d_model, 2 * m.kv_heads * m.head_dim, bias=False)
            self.o = nn.Linear(m.n_heads * m.head_dim, m.d_model, bias=False)
            self.gate_up = nn.Linear(m.d_model, 2 * m.hidden_dim, bias=False)
            self.down = nn.Linear(m.hidden_dim, m.d_model, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            h = self.attn_norm(x)
            q = self.q(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k, v = self.kv(h).view(B, T, 2, self.kv_heads, self.head_dim).unbind(2)
            k, v = (t.transpose(1, 2).repeat_interleave(self.n_heads // self.kv_heads, dim=1) for t in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
            gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(gate) * up)

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(m.vocab_size, m.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(m.n_layers))
            self.norm = nn.RMSNorm(m.d_model)

        def forward(self, input_ids, labels=None):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            logits = self.norm(x) @ self.embed.weight.T  # tied embeddings
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            return type("Out", (), {"loss": loss, "logits": logits})()

    return StandIn(), "llama-shaped stand-in (raytrainer.model not importable yet)"


class Rank0:
    """Plays rank 0: a training step, then one guardian round trip, as in the loop."""

    def __init__(self, cfg_dict: dict, threads: int):
        import torch

        from raytrainer.config import Config

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.cfg = Config.model_validate(cfg_dict)
        self.model, self.model_kind = build_model(self.cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.optim.lr)

    def run(self, steps: int, calls: int) -> dict:
        import torch

        from raytrainer.fault.guardian_actor import GuardianClient

        cfg = self.cfg
        client = GuardianClient.connect(cfg.run.name)
        seq = cfg.seq_len_at(0)
        micro = cfg.accumulation_steps(0, world_size=1)
        rows = cfg.train.micro_batch_size
        cursor = {"epoch": 0, "batch": 0, "phase": 0, "sources": {"sample": 0}}
        step_s, in_situ_us = [], []
        for step in range(steps):
            t0 = time.perf_counter()
            for _ in range(micro):
                ids = torch.randint(0, 256, (rows, seq + 1))
                out = self.model(ids[:, :-1], labels=ids[:, 1:])
                (out.loss / micro).backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            t1 = time.perf_counter()
            stats = {"loss": float(out.loss), "grad_norm": float(norm), "tokens": rows * seq * micro}
            cursor["batch"] = step
            decision = client.decide(step, stats, cursor, lr=cfg.optim.lr)
            t2 = time.perf_counter()
            if decision.apply_update:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            step_s.append(t3 - t0)
            in_situ_us.append((t2 - t1) * 1e6)
        burst_us = []
        for i in range(calls):
            t0 = time.perf_counter()
            client.decide(steps + i, {"loss": 3.0, "grad_norm": 1.0, "tokens": 8192}, cursor, lr=1e-3)
            burst_us.append((time.perf_counter() - t0) * 1e6)
        return {"step_s": step_s, "in_situ_us": in_situ_us, "burst_us": burst_us, "model": self.model_kind,
                "micro_batches": micro, "rows_per_micro_batch": rows, "seq_len": seq}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=30, help="steps measured (after 3 warmup steps)")
    parser.add_argument("--calls", type=int, default=2000, help="back-to-back round trips (burst median)")
    args = parser.parse_args()

    import ray

    from raytrainer.config import load_config, to_dict
    from raytrainer.fault.guardian_actor import start_guardian, stop_guardian

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"checkpoint.storage={tmp}", "run.name=guardian-bench"])
        threads = os.cpu_count() or 1
        ray.init(address="local", num_cpus=max(4, threads), include_dashboard=False, log_to_driver=False)
        try:
            start_guardian(cfg)
            rank0 = ray.remote(num_cpus=1)(Rank0).remote(to_dict(cfg, reveal_secrets=True), threads)
            raw = ray.get(rank0.run.remote(args.steps + 3, args.calls))
            stop_guardian(cfg.run.name)
        finally:
            ray.shutdown()

    step_s = raw["step_s"][3:]
    in_situ = raw["in_situ_us"][3:]
    step_median = statistics.median(step_s)
    rt_median = statistics.median(in_situ)
    result = {
        "name": "guardian_overhead",
        "config": args.config,
        "model": raw["model"],
        "global_batch": {"micro_batches": raw["micro_batches"], "rows": raw["rows_per_micro_batch"],
                         "seq_len": raw["seq_len"]},
        "torch_threads": threads,
        "steps_measured": len(step_s),
        "step_time_s_median": step_median,
        "round_trip_us_median_in_step": rt_median,
        "round_trip_us_p90_in_step": percentile(in_situ, 0.9),
        "round_trip_us_median_burst": statistics.median(raw["burst_us"]),
        "round_trip_us_p99_burst": percentile(raw["burst_us"], 0.99),
        "guardian_overhead_pct": 100.0 * rt_median * 1e-6 / step_median,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "guardian_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    for key in ("model", "step_time_s_median", "round_trip_us_median_in_step", "round_trip_us_median_burst",
                "round_trip_us_p99_burst"):
        print(f"{key}: {result[key]}")
    print(f"guardian_overhead_pct: {result['guardian_overhead_pct']:.3f}")


if __name__ == "__main__":
    main()

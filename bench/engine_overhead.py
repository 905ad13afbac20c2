"""Step-engine overhead: tokens/s of StepEngine against a bare PyTorch loop on the same model and batch.

Both train the `tiny` preset's model (same initial weights) on the same batch of the preset's micro-batches
(by default 2 of its 4 accumulated micro-batches of 8 x 256 tokens, so the run stays under a few minutes on 2
busy cores), in one process, at the same torch thread count:

- bare:   for each micro-batch forward + backward (loss / accumulation steps); clip_grad_norm_; AdamW step;
          zero_grad; one loss.item() for the log line. What a minimal training script does.
- engine: StepEngine.train_step on a SingleProcess strategy: label-token count, loss normaliser, autocast
          context, accumulation, global loss, pre-clip grad norm, finiteness check, lr schedule, AdamW
          step, loss-scaler and EMA bookkeeping, zero_grad.

Repeats are short and interleaved (bare, engine, engine, bare, ...) so drifts in machine load hit both
alike. The result is the median over repeats of engine tokens/s / bare tokens/s (1.0 = no overhead); the
JSON also has the same ratio per CPU second of this process, which other processes on a shared machine
disturb less, and the machine's load average.

    .venv/bin/python bench/engine_overhead.py [--repeats 20] [--steps 1] [--micro-batches 2] [--threads N]

Last line: `engine_overhead_ratio: <value>`; JSON in bench/results/engine_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def global_batch(cfg, micro_batches: int | None, seed: int = 0) -> list[dict]:
    """The preset's global batch (or its first `micro_batches` micro-batches) as one rank's micro-batches:
    random tokens, two documents a row."""
    import torch

    seq_len, size = cfg.train.seq_len, cfg.train.micro_batch_size
    rows = cfg.rows_per_global_batch(0)
    if micro_batches is not None:
        rows = min(rows, micro_batches * size)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, seq_len + 1), generator=g)
    split = torch.randint(2, seq_len - 2, (rows,), generator=g)
    position = torch.arange(seq_len).expand(rows, seq_len)
    doc_ids = (position >= split[:, None]).long()
    position_ids = torch.where(doc_ids == 0, position, position - split[:, None])
    labels = tokens[:, 1:].clone()
    labels[torch.arange(rows), split - 1] = -100
    batch = {"input_ids": tokens[:, :-1], "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, rows, size)]


class BareLoop:
    def __init__(self, cfg, model):
        import torch

        o = cfg.optim
        self.cfg, self.model = cfg, model
        self.optimizer = torch.optim.AdamW(model.optimizer_groups(o.weight_decay), lr=o.lr, betas=o.betas,
                                           eps=o.eps, foreach=True)

    def step(self, micro_batches: list[dict]) -> float:
        import torch

        for mb in micro_batches:
            loss = self.model(**mb).loss / len(micro_batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class EngineLoop:
    def __init__(self, cfg, model):
        from raytrainer.train.engine import StepEngine
        from raytrainer.train.parallelize import parallelize
        from raytrainer.train.strategy import SingleProcess

        self.strategy = SingleProcess(cfg, parallelize(model, cfg))
        self.engine = StepEngine(self.strategy.model, cfg, self.strategy)
        self.next_step = 0

    def step(self, micro_batches: list[dict]) -> float:
        stats = self.engine.train_step(micro_batches, self.next_step)
        self.next_step += 1
        return stats.loss


def timed(loop, micro_batches: list[dict], steps: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for `steps` optimizer steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loop.step(micro_batches)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved measurements of each loop")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps of each loop first")
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="accumulated micro-batches per step (default 2 of the preset's; 0: the whole "
                             "global batch)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch

    from raytrainer.config import load_config
    from raytrainer.model import Transformer

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"train.steps={10 * args.repeats * args.steps + 10}"])
    micro_batches = global_batch(cfg, args.micro_batches or None)
    tokens_per_step = sum(mb["input_ids"].numel() for mb in micro_batches)

    torch.manual_seed(cfg.train.seed)
    bare = BareLoop(cfg, Transformer(cfg.model))
    torch.manual_seed(cfg.train.seed)
    engine = EngineLoop(cfg, Transformer(cfg.model))
    timed(bare, micro_batches, args.warmup)
    timed(engine, micro_batches, args.warmup)

    tokens = tokens_per_step * args.steps
    bare_tps, engine_tps, bare_cpu, engine_cpu = [], [], [], []
    for r in range(args.repeats):
        order = [(bare, bare_tps, bare_cpu), (engine, engine_tps, engine_cpu)]
        for loop, rates, cpu_rates in order if r % 2 == 0 else reversed(order):
            wall_s, cpu_s = timed(loop, micro_batches, args.steps)
            rates.append(tokens / wall_s)
            cpu_rates.append(tokens / cpu_s)
        print(f"repeat {r}: bare {bare_tps[-1]:.0f} tokens/s, engine {engine_tps[-1]:.0f} tokens/s", flush=True)
    ratios = [e / b for e, b in zip(engine_tps, bare_tps, strict=True)]
    cpu_ratios = [e / b for e, b in zip(engine_cpu, bare_cpu, strict=True)]

    result = {
        "name": "engine_overhead",
        "config": args.config,
        "precision": cfg.precision.dtype,
        "global_batch": {"micro_batches": len(micro_batches), "rows": cfg.train.micro_batch_size,
                         "seq_len": cfg.train.seq_len, "tokens": tokens_per_step},
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "bare_tokens_per_s": bare_tps,
        "engine_tokens_per_s": engine_tps,
        "bare_tokens_per_s_median": statistics.median(bare_tps),
        "engine_tokens_per_s_median": statistics.median(engine_tps),
        "ratio_per_repeat": ratios,
        # per CPU second of this process: less sensitive to other processes taking the cores
        "cpu_time_ratio_per_repeat": cpu_ratios,
        "cpu_time_ratio_median": statistics.median(cpu_ratios),
        "ratio_of_total_time": sum(tokens / t for t in bare_tps) / sum(tokens / t for t in engine_tps),
        "engine_overhead_ratio": statistics.median(ratios),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    for key in ("bare_tokens_per_s_median", "engine_tokens_per_s_median", "torch_threads"):
        print(f"{key}: {result[key]:.1f}" if isinstance(result[key], float) else f"{key}: {result[key]}")
    print(f"ratio_per_repeat: {' '.join(f'{r:.3f}' for r in ratios)}")
    print(f"cpu_time_ratio_median: {result['cpu_time_ratio_median']:.4f}")
    print(f"ratio_of_total_time: {result['ratio_of_total_time']:.4f}")
    print(f"load_average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"engine_overhead_ratio: {result['engine_overhead_ratio']:.4f}")


if __name__ == "__main__":
    main()

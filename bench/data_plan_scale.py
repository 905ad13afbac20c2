"""The data plan at web scale, by simulation: a synthetic manifest (document lengths generated from a seed, no
token data) of 10^6, 10^8 and 10^9 documents, planned with the llama-8b preset's shapes (seq_len 8192, 4M-token
global batches, three sources).

    .venv/bin/python bench/data_plan_scale.py [--scales 1e6,1e8,1e9] [--legacy-up-to 1e7] [--steps 20]

Each figure is measured in a fresh process (one simulated rank), so its peak RSS is that rank's:
  memory    peak RSS after planning, less the RSS after imports (the shard table, the windows being read, the
            plan's own state)
  start     building what the planner needs from the manifest, then the first global batch from step 0: the
            planning part of a data feed's start-up
  per_step  planning time per global batch over --steps batches after the first
  seek      the first batch from a cursor at step 10^6 (half-way through every stream's epoch), and at step 10
The planner that held every document in memory (raytrainer.data.index, replaced by the window plan) was
measured the same way, side by side, at commit 3899349: `git checkout 3899349 && .venv/bin/python
bench/data_plan_scale.py --scales 1e6,1e7,1e8 --legacy-up-to 1e8` (see bench/RESULTS.md).
Last line: JSON; also in bench/results/data_plan_scale.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
DOCS_PER_SHARD = 10_000
SOURCES = ("web", "code", "books")
TOKENIZER = {"name": "byte", "eos_id": 256, "pad_id": 257, "vocab_size": 258}


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_planner(table, columns, cfg, objective, cursor):
    from raytrainer.data.plan import Planner

    return Planner(table, columns, cfg, objective, cursor)


def measure_one(n_docs: int, steps: int) -> dict:
    from raytrainer.config import load_config
    from raytrainer.data.cursor import Cursor, StreamPosition
    from raytrainer.data.objectives import Objective
    from raytrainer.data.shard_table import synthetic_dataset

    cfg = load_config("llama-8b", [])
    objective = Objective.from_config(cfg.data, cfg.train.seed, TOKENIZER)
    make = make_planner
    base = rss_gb()
    t0 = time.perf_counter()
    table, columns = synthetic_dataset(max(1, n_docs // DOCS_PER_SHARD), DOCS_PER_SHARD, seed=0, sources=SOURCES)
    planner = make(table, columns, cfg, objective, None)
    planner.next_batch()
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        planner.next_batch()
    per_step_ms = (time.perf_counter() - t0) / steps * 1000

    def seek(step: int, fraction: float) -> float:
        cursor = Cursor(batch=step, step=step, streams={
            key: StreamPosition(epoch=0, pos=int(table.stream_docs[k] * fraction), consumed=0)
            for k, key in enumerate(table.streams)})
        t = time.perf_counter()
        make(table, columns, cfg, objective, cursor).next_batch()
        return time.perf_counter() - t

    seek_10_s, seek_1m_s = seek(10, 0.0001), seek(10**6, 0.5)
    return {"planner": "window", "documents": table.num_documents, "shards": len(table),
            "memory_gb": round(rss_gb() - base, 3), "start_s": round(start_s, 3), "per_step_ms": round(per_step_ms, 2),
            "seek_step_10_s": round(seek_10_s, 3), "seek_step_1e6_s": round(seek_1m_s, 3),
            "rows_per_batch": cfg.rows_per_global_batch(0), "seq_len": cfg.seq_len_at(0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1e6,1e8,1e9")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(int(args.one), args.steps)))
        return
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        done = subprocess.run([sys.executable, __file__, "--one", str(scale), "--steps", str(args.steps)],
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['documents']:>13,} docs  memory {row['memory_gb']:7.3f} GB  "
              f"start {row['start_s']:7.2f} s  per step {row['per_step_ms']:7.1f} ms  "
              f"seek step 10 {row['seek_step_10_s']:6.2f} s, "
              f"step 1e6 {row['seek_step_1e6_s']:6.2f} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_plan_scale.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

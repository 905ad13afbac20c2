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
The planner that held every document in memory (raytrainer.data.index + its Planner, until the window planner
replaced it) is measured the same way with `--planner index` at a commit that has it; see bench/RESULTS.md.
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


def window_planner(table, columns, cfg, objective, cursor):
    from raytrainer.data.window_plan import WindowPlanner

    return WindowPlanner(table, columns, cfg, objective, cursor)


def index_planner(table, columns, cfg, objective, cursor):
    """Every document's planning columns in one in-memory index, as raytrainer.data.index builds it."""
    import numpy as np

    from raytrainer.data.index import DocIndex
    from raytrainer.data.manifest import Manifest, ShardRecord
    from raytrainer.data.plan import Planner

    shards = [ShardRecord(f"s{i}.parquet", *table.streams[int(table.stream[i])], int(table.num_docs[i]),
                          int(table.num_tokens[i]), 0, "") for i in range(len(table))]
    manifest = Manifest(tokenizer=TOKENIZER, token_dtype="uint16", length_buckets=list(table.buckets), shards=shards,
                        sources={}, length_histogram={}, chars_per_token=1.0)
    n = table.num_documents
    shard = np.repeat(np.arange(len(table), dtype=np.int32), table.num_docs)
    row = (np.arange(n, dtype=np.int64) - np.repeat(table.first_doc, table.num_docs)).astype(np.int32)
    length = np.empty(n, dtype=np.int32)
    quality = np.empty(n, dtype=np.float32)
    for i in range(len(table)):
        got = columns.read(i)
        a = int(table.first_doc[i])
        length[a: a + len(got.length)], quality[a: a + len(got.length)] = got.length, got.quality
    index = DocIndex(dataset="synthetic", manifest=manifest, doc_id=np.arange(n, dtype=np.int64), shard=shard, row=row,
                     length=length, quality=quality, stream=table.stream[shard], streams=table.streams, dropped=(),
                     fingerprint=table.fingerprint)
    return Planner(index, cfg, objective, cursor)


def measure_one(n_docs: int, planner_name: str, steps: int) -> dict:
    from raytrainer.config import load_config
    from raytrainer.data.cursor import Cursor, StreamPosition
    from raytrainer.data.objectives import Objective
    from raytrainer.data.shard_table import synthetic_dataset

    cfg = load_config("llama-8b", [])
    objective = Objective.from_config(cfg.data, cfg.train.seed, TOKENIZER)
    make = {"window": window_planner, "index": index_planner}[planner_name]
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
    return {"planner": planner_name, "documents": table.num_documents, "shards": len(table),
            "memory_gb": round(rss_gb() - base, 3), "start_s": round(start_s, 3), "per_step_ms": round(per_step_ms, 2),
            "seek_step_10_s": round(seek_10_s, 3), "seek_step_1e6_s": round(seek_1m_s, 3),
            "rows_per_batch": cfg.rows_per_global_batch(0), "seq_len": cfg.seq_len_at(0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1e6,1e8,1e9")
    parser.add_argument("--planner", choices=["window", "index"], default="window")
    parser.add_argument("--legacy-up-to", type=float, default=0,
                        help="also measure --planner index at the scales up to this many documents")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(int(args.one), args.planner, args.steps)))
        return
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        planners = [args.planner] + (["index"] if args.planner == "window" and scale <= args.legacy_up_to else [])
        for name in planners:
            done = subprocess.run([sys.executable, __file__, "--one", str(scale), "--planner", name, "--steps",
                                   str(args.steps)], capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{name:7s} {row['documents']:>13,} docs  memory {row['memory_gb']:7.3f} GB  "
                  f"start {row['start_s']:7.2f} s  per step {row['per_step_ms']:7.1f} ms  "
                  f"seek step 10 {row['seek_step_10_s']:6.2f} s, "
                  f"step 1e6 {row['seek_step_1e6_s']:6.2f} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_plan_scale.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Data pipeline throughput: packed tokens/s through the Ray Data pipeline, side by side with a raw pyarrow
read of the same shards, against what the tiny model consumes; and packing efficiency on the sample corpus.

    .venv/bin/python bench/data_pipeline.py [--data data/sample] [--steps 6000] [--read-tasks 1]

Measured in one run, on the same shards:
  raw        every shard's `tokens` column read with pyarrow into numpy (best of 5 passes before and 5 after
             the Ray run; files cached)
  pipeline   DataFeed.next_step() on rank 0 of 1 through Ray Data, packed tokens delivered as int64 torch
             micro-batches as fast as they are taken. Steady state: the steps after --warm-steps (Ray worker
             processes up, their shard caches filled); also reported over every step after the first, and
             the first step's latency (Ray Data start-up)
  local      the same stream made in this process (the fallback path), steady state
  model      configs/tiny.yaml forward + backward + AdamW over whole global batches of the pipeline's
             micro-batches (document-masked attention), tokens/s on this machine
  packing    the plan over about one pass of the corpus at seq_len 512 and 2048: share of positions holding
             real tokens, share with a label, documents cut across rows

Last line: `pipeline_vs_raw: <steady pipeline rate / raw rate>`; JSON in bench/results/data_pipeline.json.
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


def ensure_dataset(path: str) -> tuple[str, str]:
    if (Path(path) / "manifest.json").exists():
        return path, "existing"
    from raytrainer.data.sample_corpus import make_sample_dataset

    make_sample_dataset(path, "byte", use_ray=False)
    return path, "made by make_sample_dataset"


def raw_read(dataset: str, passes: int = 5) -> dict:
    import pyarrow.parquet as pq

    from raytrainer.data.manifest import Manifest

    manifest = Manifest.load(dataset)
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        tokens = 0
        for shard in manifest.shards:
            column = pq.read_table(f"{dataset}/{shard.path}", columns=["tokens"]).column("tokens")
            tokens += len(column.combine_chunks().values.to_numpy())
        rates.append(tokens / (time.perf_counter() - t0))
    return {"tokens": tokens, "tokens_per_s": max(rates), "tokens_per_s_passes": rates}


def pipeline(cfg, dataset: str, steps: int, use_ray: bool, warm_steps: int) -> dict:
    """Tokens/s over every step after the first, and over the steps after `warm_steps` (steady state: Ray
    worker processes started and their shard caches filled)."""
    from raytrainer.data.feed import DataFeed

    feed = DataFeed(cfg, dataset, 0, 1, use_ray=use_ray)
    t0 = time.perf_counter()
    feed.next_step()
    first = time.perf_counter() - t0
    served, waits, marks = 0, [], []
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        t = time.perf_counter()
        micro = feed.next_step()
        waits.append(time.perf_counter() - t)
        served += sum(mb["input_ids"].numel() for mb in micro)
        marks.append((time.perf_counter(), served))
    feed.close()
    (t_warm, tokens_warm), (t_end, tokens_end) = marks[warm_steps - 1], marks[-1]
    return {"first_step_s": first, "steps": steps - 1, "tokens": served,
            "tokens_per_s": served / (t_end - t0),
            "steady_tokens_per_s": (tokens_end - tokens_warm) / (t_end - t_warm),
            "steady_from_step": warm_steps,
            "step_wait_ms_median": 1e3 * statistics.median(waits), "step_wait_ms_max": 1e3 * max(waits)}


def model_rate(dataset: str, steps: int = 6) -> dict:
    import torch

    from raytrainer.config import load_config
    from raytrainer.data.feed import DataFeed
    from raytrainer.model import Transformer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    cfg = load_config("tiny", [f"data.path={dataset}"])
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    feed = DataFeed(cfg, dataset, use_ray=False)
    times = []
    for step in range(steps + 2):
        micro = feed.next_step()
        t0 = time.perf_counter()
        for mb in micro:
            out = model(mb["input_ids"], labels=mb["labels"], position_ids=mb["position_ids"],
                        doc_ids=mb["doc_ids"])
            (out.loss / len(micro)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"config": "tiny", "global_batch_tokens": cfg.train.global_batch_tokens,
            "seq_len": cfg.seq_len_at(0), "step_s_median": step_s,
            "tokens_per_s": cfg.train.global_batch_tokens / step_s, "torch_threads": torch.get_num_threads()}


def packing_efficiency(dataset: str, seq_len: int) -> dict:
    import numpy as np

    from raytrainer.config import load_config
    from raytrainer.data.fs import open_storage
    from raytrainer.data.manifest import Manifest
    from raytrainer.data.objectives import Objective
    from raytrainer.data.packing import DOC, END, START
    from raytrainer.data.plan import Planner
    from raytrainer.data.shard_table import ParquetColumns, ShardTable

    rows = 64
    cfg = load_config("tiny", [f"train.seq_len={seq_len}", f"train.global_batch_tokens={seq_len * rows}",
                               f"model.max_seq_len={seq_len}"])
    manifest = Manifest.load(dataset)
    table, columns = ShardTable.from_manifest(manifest), ParquetColumns(open_storage(dataset), manifest)
    length = np.concatenate([columns.read(i).length for i in range(len(table))])  # by document id
    planner = Planner(table, columns, cfg, Objective.from_config(cfg.data, cfg.train.seed, manifest.tokenizer))
    batches = max(1, manifest.num_tokens // (seq_len * rows))
    positions = real = labelled = 0
    split_docs, started_docs = set(), set()
    for _ in range(batches):
        segments = planner.next_batch().segments
        lengths = length[segments[:, DOC]]
        covered = int((segments[:, END] - segments[:, START]).sum())
        positions += seq_len * rows
        real += covered
        labelled += covered - int((segments[:, END] == lengths).sum())  # a document's EOS predicts nothing
        split_docs.update(int(d) for d in segments[segments[:, START] > 0][:, DOC])
        started_docs.update(int(d) for d in segments[segments[:, START] == 0][:, DOC])
    return {"seq_len": seq_len, "global_batches": batches, "real_token_share": real / positions,
            "label_share": labelled / positions, "documents": len(started_docs),
            "documents_cut_across_rows": len(split_docs & started_docs) / max(1, len(started_docs)),
            "mean_document_tokens": float(np.mean(length))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/sample")
    # Long runs: the pipeline may hold up to two windows (8 blocks of 4M tokens each) made ahead, and the
    # steady rate must not be the rate of draining them.
    parser.add_argument("--steps", type=int, default=6000, help="global batches through each pipeline")
    parser.add_argument("--warm-steps", type=int, default=2000, help="steps before the steady-state rate")
    parser.add_argument("--read-tasks", type=int, default=1, help="data.read_tasks: Ray Data tasks at once")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--global-batch-tokens", type=int, default=65536)
    args = parser.parse_args()

    import ray

    from raytrainer.config import load_config

    dataset, origin = ensure_dataset(args.data)
    dataset = str(Path(dataset).resolve())
    cfg = load_config("tiny", [f"data.path={dataset}", f"train.seq_len={args.seq_len}",
                               f"train.global_batch_tokens={args.global_batch_tokens}",
                               f"model.max_seq_len={max(512, args.seq_len)}",
                               f"data.read_tasks={args.read_tasks}"])
    raw_before = raw_read(dataset)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = pipeline(cfg, dataset, args.steps, use_ray=True, warm_steps=args.warm_steps)
    finally:
        ray.shutdown()
    raw_after = raw_read(dataset)
    local = pipeline(cfg, dataset, args.steps, use_ray=False, warm_steps=args.warm_steps)
    model = model_rate(dataset)
    packing = [packing_efficiency(dataset, n) for n in (512, 2048)]

    raw_rate = max(raw_before["tokens_per_s"], raw_after["tokens_per_s"])
    result = {
        "name": "data_pipeline",
        "dataset": {"path": dataset, "origin": origin, "tokens": raw_before["tokens"]},
        "stream": {"seq_len": args.seq_len, "global_batch_tokens": args.global_batch_tokens,
                   "micro_batch_size": cfg.train.micro_batch_size,
                   "prefetch_batches": cfg.data.prefetch_batches,
                   "read_tasks": cfg.data.read_tasks},
        "raw_read": {"tokens_per_s": raw_rate, "passes": raw_before["tokens_per_s_passes"]
                     + raw_after["tokens_per_s_passes"]},
        "ray_pipeline": on_ray,
        "local_pipeline": local,
        "model": model,
        "packing": packing,
        "pipeline_vs_raw": on_ray["steady_tokens_per_s"] / raw_rate,
        "pipeline_vs_raw_with_startup": on_ray["tokens_per_s"] / raw_rate,
        "local_vs_raw": local["steady_tokens_per_s"] / raw_rate,
        "pipeline_vs_model": on_ray["tokens_per_s"] / model["tokens_per_s"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"raw_read_tokens_per_s: {raw_rate:.3e}")
    print(f"ray_pipeline_tokens_per_s: {on_ray['steady_tokens_per_s']:.3e} steady, "
          f"{on_ray['tokens_per_s']:.3e} with start-up (first step {on_ray['first_step_s']:.1f}s)")
    print(f"local_pipeline_tokens_per_s: {local['steady_tokens_per_s']:.3e}")
    print(f"tiny_model_tokens_per_s: {model['tokens_per_s']:.3e}")
    print(f"pipeline_vs_model: {result['pipeline_vs_model']:.1f}")
    for p in packing:
        print(f"packing_seq{p['seq_len']}: real {p['real_token_share']:.4f}, "
              f"labelled {p['label_share']:.4f}, cut {p['documents_cut_across_rows']:.3f}")
    print(f"pipeline_vs_raw: {result['pipeline_vs_raw']:.3f}")


if __name__ == "__main__":
    main()

"""Training stall per checkpoint: asynchronous vs synchronous upload, to a real S3 server (SeaweedFS).

The tiny model trains in this process (the Ray worker's loop, without Ray) for --steps steps, saving every
--every steps to s3:// on a SeaweedFS server started here. Two kinds of run, interleaved over --rounds:
  sync    checkpoint.async_upload=false: the step waits while the state is written to local disk,
          uploaded and committed
  async   checkpoint.async_upload=true: the step waits for a host-memory copy of the state; writing,
          upload and commit happen on a background thread

The stall is the time the loop spends inside the save call, per mid-run checkpoint (the final checkpoint
is always synchronous and not counted). Retention runs as in training, with --keep-last 1 by default, so
every commit after the first deletes the previous checkpoint while the run goes on; the deletions each run
made are reported. With --baseline, a run without checkpoints is added and the wall
time per checkpoint over it is reported too (background work competing for the cores included); on a
2-core machine that figure is within the step-time noise.

    .venv/bin/python bench/checkpoint_stall.py [--steps 12] [--every 3] [--rounds 3] [--keep-last 1] [--baseline]

Last line: `async_vs_sync_stall: <async stall / sync stall>`; JSON in bench/results/checkpoint_stall.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

RESULTS = Path(__file__).resolve().parent / "results"


def timed_run(cfg) -> dict:
    import torch

    from raytrainer.fault.guardian import Guardian
    from raytrainer.train.loop import WorkerEnv
    from raytrainer.train.ray_entry import build_trainer

    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    blocked: list[float] = []
    save = trainer.checkpoints.save

    def timed_save(state, engine, final=False):
        started = time.perf_counter()
        save(state, engine, final=final)
        if not final:
            blocked.append(time.perf_counter() - started)

    trainer.checkpoints.save = timed_save
    deleted: list[int] = []
    retain = trainer.checkpoints.retain

    def counted_retain(pin):
        gone = retain(pin)
        deleted.extend(gone)
        return gone

    trainer.checkpoints.retain = counted_retain
    step = trainer.restore()
    started = time.perf_counter()
    while step < cfg.train.steps:
        step = trainer.train_step(step)
    trainer.checkpoints.wait()  # the last background upload is part of the cost
    wall = time.perf_counter() - started
    trainer.checkpoints.finish()  # the background deletions, so the next run starts on a quiet store
    return {"wall_s": wall, "saves": len(blocked), "blocked_s": blocked, "retention_deleted": deleted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--baseline", action="store_true", help="also time runs without checkpoints")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the rest is left to uploads)")
    parser.add_argument("--keep-last", type=int, default=1, help="checkpoint.keep_last (retention)")
    args = parser.parse_args()

    import torch

    from raytrainer.config import load_config
    from raytrainer.storage_server import LocalS3Server
    from runs import make_dataset

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="checkpoint-stall-"))
    server = LocalS3Server(work / "s3").start()
    try:
        dataset = make_dataset(work)
        s3 = server.s3_config()

        def config(mode: str, round_: int):
            every = args.steps * 10 if mode == "none" else args.every
            return load_config("tiny", [
                f"data.path={dataset}", f"train.steps={args.steps}", f"run.name={mode}-{round_}",
                f"checkpoint.storage={server.url('stall')}", f"checkpoint.s3.endpoint_url={s3.endpoint_url}",
                f"checkpoint.s3.access_key_id={server.access_key}",
                f"checkpoint.s3.secret_access_key={server.secret_key}",
                f"checkpoint.every_steps={every}", f"checkpoint.async_upload={mode == 'async'}",
                "checkpoint.every_minutes=null", "train.log_every=1000", f"checkpoint.keep_last={args.keep_last}",
            ])

        modes = ["none", "sync", "async"] if args.baseline else ["sync", "async"]
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                result = timed_run(config(mode, r))
                runs[mode].append(result)
                print(f"round {r} {mode:5s}: {result['wall_s']:.2f}s, {result['saves']} saves, blocked "
                      f"{sum(result['blocked_s']):.2f}s, retention deleted {result['retention_deleted']}",
                      flush=True)

        summary = {}
        for mode in ("sync", "async"):
            summary[mode] = {
                "checkpoints_per_run": runs[mode][0]["saves"],
                "retention_deletions_per_run": statistics.median(len(x["retention_deleted"]) for x in runs[mode]),
                "stall_s_per_checkpoint": statistics.median(statistics.mean(x["blocked_s"]) for x in runs[mode]),
            }
        # the step time: from the runs without checkpoints where there are some, else from the sync runs
        step_s = statistics.median(x["wall_s"] for x in runs[modes[0]]) / args.steps
        if args.baseline:
            base = step_s * args.steps
            for mode in ("sync", "async"):
                summary[mode]["wall_s_per_checkpoint"] = (
                    statistics.median(x["wall_s"] for x in runs[mode]) - base) / summary[mode]["checkpoints_per_run"]
        result = {
            "name": "checkpoint_stall",
            "config": {"model": "tiny", "steps": args.steps, "every": args.every, "rounds": args.rounds,
                       "torch_threads": args.threads, "keep_last": args.keep_last},
            "checkpoint_mb": _checkpoint_mb(server, "sync-0"),
            "step_s": step_s,
            "runs": runs,
            **summary,
            "async_vs_sync_stall": summary["async"]["stall_s_per_checkpoint"]
            / summary["sync"]["stall_s_per_checkpoint"],
            "async_stall_vs_step": summary["async"]["stall_s_per_checkpoint"] / step_s,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_stall.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint: {result['checkpoint_mb']:.1f} MB; step {step_s:.3f}s")
    for mode in ("sync", "async"):
        s = result[mode]
        wall = f", wall {s['wall_s_per_checkpoint']:.3f}s" if "wall_s_per_checkpoint" in s else ""
        print(f"{mode}: stall {s['stall_s_per_checkpoint']:.3f}s per checkpoint{wall}, "
              f"{s['retention_deletions_per_run']:g} retention deletions per run")
    print(f"async_stall_vs_step: {result['async_stall_vs_step']:.4f}")
    print(f"async_vs_sync_stall: {result['async_vs_sync_stall']:.3f}")


def _checkpoint_mb(server, run: str) -> float:
    import s3fs

    from raytrainer.storage import s3fs_options

    fs = s3fs.S3FileSystem(**s3fs_options(server.s3_config()))
    files = fs.find(f"{server.bucket}/stall/{run}/checkpoints", detail=True)
    steps = {path.split("/checkpoints/")[1].split("/")[0] for path in files}
    return sum(info["size"] for info in files.values()) / max(1, len(steps)) / 1e6


if __name__ == "__main__":
    main()

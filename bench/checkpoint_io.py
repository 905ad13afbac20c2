"""Checkpoint save/load throughput through the checkpoint store, against a raw s3fs put/get of the same bytes.

A DCP checkpoint of random fp32 tensors (default 256 MB, written the way the trainer writes one) is
uploaded and downloaded, alternately, by
  - raw:   s3fs `put` / `get` of the directory (no hashing, no commit record, no verification),
  - store: CheckpointStore.save_rank (sha256 while streaming, commit record) and .download (every
           sha256 checked on the way in),
to a SeaweedFS server on loopback (started here, or --endpoint for one already running). Each side's
best round is kept, so a noisy neighbour on the machine costs both the same.

    .venv/bin/python bench/checkpoint_io.py [--mb 256] [--files 8] [--rounds 3]

Last line: `checkpoint_io_ratio: <value>` = min(store/raw save throughput, store/raw load throughput);
JSON in bench/results/checkpoint_io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def write_dcp_checkpoint(out_dir: Path, total_mb: int, files: int) -> int:
    """A DCP checkpoint of `files` fp32 tensors holding total_mb MB in all; returns its size in bytes."""
    import torch
    import torch.distributed.checkpoint as dcp

    numel = total_mb * 1024 * 1024 // 4 // files
    gen = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(numel, generator=gen) for i in range(files)}
    # One process, no process group: DCP writes a single-rank checkpoint (__0_0.distcp + .metadata).
    dcp.save(state, checkpoint_id=str(out_dir), no_dist=True)
    return sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="checkpoint size in MB")
    parser.add_argument("--files", type=int, default=8, help="tensors in the checkpoint")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--endpoint", default=None, help="use this S3 endpoint instead of starting SeaweedFS")
    parser.add_argument("--access-key", default="raytrainer-access")
    parser.add_argument("--secret-key", default="raytrainer-secret")
    parser.add_argument("--bucket", default="raytrainer")
    parser.add_argument("--io-threads", type=int, default=4)
    args = parser.parse_args()

    import s3fs

    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.config import S3Config
    from raytrainer.storage import s3fs_options
    from raytrainer.storage_server import LocalS3Server

    work = Path(tempfile.mkdtemp(prefix="checkpoint-io-"))
    server = None
    try:
        if args.endpoint:
            cfg = S3Config(endpoint_url=args.endpoint, access_key_id=args.access_key,
                           secret_access_key=args.secret_key)
        else:
            server = LocalS3Server(work / "s3", bucket=args.bucket).start()
            cfg = server.s3_config()
        staging = work / "staging"
        nbytes = write_dcp_checkpoint(staging, args.mb, args.files)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        print(f"checkpoint: {nbytes / 1e6:.0f} MB in {len(files)} files; S3 at {cfg.endpoint_url}",
              flush=True)

        raw = s3fs.S3FileSystem(**s3fs_options(cfg))
        prefix = f"{args.bucket}/bench-{os.getpid()}"
        store = CheckpointStore(f"s3://{prefix}/store", "bench", cfg, io_threads=args.io_threads)
        rounds = []
        for r in range(args.rounds):
            raw_remote = f"{prefix}/raw/round{r}"
            raw_down, store_down = work / f"raw-down{r}", work / f"store-down{r}"
            ops = {
                "raw_save": partial(raw.put, str(staging), raw_remote, recursive=True),
                "store_save": partial(store.save_rank, r, staging, 0, 1, {"round": r}),
                "raw_load": partial(raw.get, raw_remote, str(raw_down), recursive=True),
                "store_load": partial(store.download, r, store_down),
            }
            # Alternate who goes first, and flush dirty pages before each timing, so neither side pays
            # for the other's writeback.
            order = ["raw", "store"] if r % 2 == 0 else ["store", "raw"]
            result = {}
            for phase in ("save", "load"):
                for side in order:
                    os.sync()
                    result[f"{side}_{phase}_s"] = timed(ops[f"{side}_{phase}"])
            for name, down in (("raw", raw_down), ("store", store_down)):
                got = dir_bytes(down)
                assert got == nbytes, f"{name} download has {got} of {nbytes} bytes"
            rounds.append(result)
            print(f"round {r}: save raw {result['raw_save_s']:.2f}s store {result['store_save_s']:.2f}s | "
                  f"load raw {result['raw_load_s']:.2f}s store {result['store_load_s']:.2f}s", flush=True)
            shutil.rmtree(raw_down)
            shutil.rmtree(store_down)
            raw.rm(raw_remote, recursive=True)
            store.delete(r)

        def best_mb_s(key: str) -> float:
            return nbytes / 1e6 / min(x[key] for x in rounds)

        mb_s = {k: best_mb_s(f"{k}_s") for k in ("raw_save", "store_save", "raw_load", "store_load")}
        save_ratio = mb_s["store_save"] / mb_s["raw_save"]
        load_ratio = mb_s["store_load"] / mb_s["raw_load"]
        ratio = min(save_ratio, load_ratio)
        report = {
            "checkpoint_bytes": nbytes,
            "files": len(files),
            "rounds": rounds,
            "throughput_mb_s": {k: round(v, 1) for k, v in mb_s.items()},
            "save_ratio": round(save_ratio, 3),
            "load_ratio": round(load_ratio, 3),
            "checkpoint_io_ratio": round(ratio, 3),
            "io_threads": args.io_threads,
            "server": "SeaweedFS weed mini on 127.0.0.1" if server else args.endpoint,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "checkpoint_io.json").write_text(json.dumps(report, indent=2))
        print(f"throughput MB/s: save raw {mb_s['raw_save']:.0f} store {mb_s['store_save']:.0f} "
              f"(x{save_ratio:.2f}) | load raw {mb_s['raw_load']:.0f} store {mb_s['store_load']:.0f} "
              f"(x{load_ratio:.2f})")
        print(f"checkpoint_io_ratio: {ratio:.3f}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

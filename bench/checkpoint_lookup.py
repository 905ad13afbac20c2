"""Time to find the newest complete checkpoint, with 10 vs 1,000 committed steps.

For each location (local disk, and a SeaweedFS S3 server on loopback started here unless --no-s3) two runs
are filled with tiny committed checkpoints through `CheckpointStore.save_rank` (one rank, one 64-byte
file each, steps 1..N), and `CheckpointStore.latest_complete()` is timed --repeats times on a fresh store
object each time (nothing cached between calls). The store lists the step directories once,
non-recursively, and opens only the newest ones, so the time should barely grow with the number of steps;
the bench also counts the storage calls one lookup makes.

    .venv/bin/python bench/checkpoint_lookup.py [--repeats 20] [--no-s3]

Last line: `lookup_1000_vs_10: <median time with 1,000 steps / with 10>` (on S3 when it ran, else local
disk); JSON in bench/results/checkpoint_lookup.json.
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
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (10, 1000)


def fill(url: str, run: str, steps: int, s3cfg, work: Path) -> None:
    from raytrainer.checkpoint.store import CheckpointStore

    stage = work / "stage"
    with CheckpointStore(url, run, s3cfg, io_threads=8) as store:
        for step in range(1, steps + 1):
            (stage / "model").mkdir(parents=True, exist_ok=True)
            (stage / "model" / "shard.bin").write_bytes(step.to_bytes(8, "little") * 8)
            store.save_rank(step, stage, 0, 1, metadata={"step": step})


def count_calls(calls: Counter) -> None:
    """Count Storage's listing and reading calls (what a lookup costs in requests on S3)."""
    from raytrainer.storage import Storage

    for name in ("listdir", "list_files", "read_bytes", "size"):
        original = getattr(Storage, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        setattr(Storage, name, counted)


def measure(url: str, run: str, steps: int, s3cfg, repeats: int, calls: Counter) -> dict:
    from raytrainer.checkpoint.store import CheckpointStore

    times = []
    for i in range(repeats + 1):
        store = CheckpointStore(url, run, s3cfg)
        calls.clear()
        started = time.perf_counter()
        latest = store.latest_complete()
        elapsed = time.perf_counter() - started
        store.close()
        if latest != steps:
            raise RuntimeError(f"{url}/{run}: latest_complete() = {latest}, expected {steps}")
        if i:  # the first call warms the connection and imports
            times.append(elapsed)
    return {"steps": steps, "median_s": statistics.median(times), "min_s": min(times), "calls": dict(calls)}


def location(name: str, url: str, s3cfg, repeats: int, work: Path, calls: Counter) -> dict:
    out: dict = {}
    for steps in SIZES:
        started = time.perf_counter()
        fill(url, f"lookup-{steps}", steps, s3cfg, work)
        fill_s = time.perf_counter() - started
        out[str(steps)] = {**measure(url, f"lookup-{steps}", steps, s3cfg, repeats, calls), "fill_s": fill_s}
        print(f"{name}, {steps} steps: latest_complete() {out[str(steps)]['median_s'] * 1e3:.2f} ms median, "
              f"calls {out[str(steps)]['calls']}", flush=True)
    out["ratio_1000_vs_10"] = out["1000"]["median_s"] / out["10"]["median_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-s3", action="store_true", help="local disk only")
    args = parser.parse_args()

    calls: Counter = Counter()
    count_calls(calls)
    work = Path(tempfile.mkdtemp(prefix="checkpoint-lookup-"))
    result: dict = {"name": "checkpoint_lookup", "repeats": args.repeats}
    server = None
    try:
        result["local"] = location("local", str(work / "store"), None, args.repeats, work, calls)
        if not args.no_s3:
            from raytrainer.storage_server import LocalS3Server, StorageServerError

            try:
                server = LocalS3Server(work / "s3").start()
            except (StorageServerError, OSError) as e:
                print(f"no S3 server ({e}); local disk only")
            if server is not None:
                result["s3"] = location("s3", server.url("lookup"), server.s3_config(), args.repeats, work, calls)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_lookup.json").write_text(json.dumps(result, indent=2) + "\n")
    for where in ("local", "s3"):
        if where in result:
            print(f"{where}: 1000 vs 10 steps {result[where]['ratio_1000_vs_10']:.2f}x")
    headline = result.get("s3", result["local"])
    print(f"lookup_1000_vs_10: {headline['ratio_1000_vs_10']:.2f}")


if __name__ == "__main__":
    main()

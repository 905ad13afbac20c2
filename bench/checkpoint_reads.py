"""Bytes each rank reads from the checkpoint store on resume, as a fraction of the checkpoint.

Two measurements of one FSDP2 model + AdamW (d_model 512, 2 layers, vocab 8192, untied: 14.7M parameters,
a 177 MB checkpoint):

  real       2 ranks (gloo, CPU processes) save through the CheckpointManager to a local store and load it
             back on 2 ranks and on 1, counting every byte each rank reads through `Storage`
  simulated  64 ranks in this one process, each on a fake process group of 64 ("fake" backend: no
             communication): each simulated rank's FSDP2 state is planned and written with DCP's own
             planners as 64 ranks would write it, each rank's files committed through the store, then
             each simulated rank makes the manager's two downloads (trainer state, RNG, DCP metadata;
             then the files its load plan touches) through a counting `Storage` and loads its state from
             them alone (DCP without collectives), checking the values

Target: each rank reads ≤ 1.5/W of the checkpoint + the metadata (DCP `.metadata`, trainer state, RNG
file and the commit records it reads).

    .venv/bin/python bench/checkpoint_reads.py [--ranks 64]

Last line: `max_rank_read_fraction_64_simulated: <largest fraction any simulated rank read>`; JSON in
bench/results/checkpoint_reads.json.
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
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = ["model.vocab_size=8192", "model.d_model=512", "model.n_layers=2", "model.n_heads=8",
         "model.n_kv_heads=4", "model.multiple_of=64", "model.tie_embeddings=false"]
STEP = 1


def config(store_dir: Path, run: str):
    from strategy_harness import tiny_config

    return tiny_config("fsdp", *MODEL, f"checkpoint.storage={store_dir}", f"run.name={run}",
                       "checkpoint.async_upload=false")


class Counter:
    """Counts the bytes read through Storage (read_chunks is under download_file; read_bytes reads the
    commit records and JSON), per file."""

    def __init__(self):
        self.reads: list[tuple[str, int]] = []
        self.active = False

    def install(self) -> Counter:
        from raytrainer.storage import Storage

        read_bytes, read_chunks = Storage.read_bytes, Storage.read_chunks
        counter = self

        def counted_read_bytes(storage, rel):
            data = read_bytes(storage, rel)
            if counter.active:
                counter.reads.append((storage.uri(rel), len(data)))
            return data

        def counted_read_chunks(storage, rel, *args, **kwargs):
            for chunk in read_chunks(storage, rel, *args, **kwargs):
                if counter.active:
                    counter.reads.append((storage.uri(rel), len(chunk)))
                yield chunk

        Storage.read_bytes, Storage.read_chunks = counted_read_bytes, counted_read_chunks
        return self

    def take(self) -> list[tuple[str, int]]:
        out, self.reads = self.reads, []
        return out


def sizes(store_dir: Path, run: str) -> dict:
    from raytrainer.checkpoint.store import CheckpointStore

    records = CheckpointStore(str(store_dir), run).records(STEP)
    files = {rel: e["size"] for r in records.values() for rel, e in r.files.items()}
    return {"files": files, "total": sum(files.values()),
            "records": sum(len(r.to_json()) for r in records.values()),
            "small": sum(s for rel, s in files.items() if not rel.endswith(".distcp"))}


def summary(reads: list[tuple[str, int]], size: dict, world_size: int, rank: int) -> dict:
    read = sum(n for _, n in reads)
    records = sum(n for uri, n in reads if "/_commit/" in uri)
    # the metadata this rank reads: everything but DCP's shard files
    metadata = sum(n for uri, n in reads if not uri.endswith(".distcp"))
    return {"rank": rank, "bytes": read, "fraction": read / size["total"],
            "shard_fraction": (read - metadata) / size["total"], "metadata_bytes": metadata,
            "record_bytes": records, "files": len({uri for uri, _ in reads if "/_commit/" not in uri}),
            "target_fraction": 1.5 / world_size + metadata / size["total"]}


# ---------------------------------------------------------------------------------------------- real ranks


def real_job(rank: int, world_size: int, out_dir: Path, phase: str) -> None:
    import torch.distributed as dist

    from raytrainer.checkpoint.manager import CheckpointManager, TrainerState, all_ranks_agree
    from strategy_harness import build, save_result, train_steps

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    cfg = config(out_dir / "store", "reads")
    strategy, engine = build(cfg, rank, world_size)
    env = SimpleNamespace(rank=rank, world_size=world_size, broadcast=broadcast, agree=all_ranks_agree)
    manager = CheckpointManager(cfg, env, staging_root=out_dir / f"staging-{phase}")
    counter = Counter().install()
    started = time.perf_counter()
    if phase == "save":
        train_steps(engine, cfg, [0], rank, world_size)
        manager.save(TrainerState(step=STEP, cursor={}), engine)
    else:
        counter.active = True
        manager.load(STEP, engine)
        counter.active = False
    elapsed = time.perf_counter() - started
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in strategy.module.named_parameters()}
    save_result(out_dir, phase, rank, {"reads": counter.take(), "seconds": elapsed, "params": params})
    manager.finish()


def real(work: Path) -> dict:
    from strategy_harness import load_result, spawn

    spawn(real_job, 2, work, "save")
    spawn(real_job, 2, work, "load2")
    spawn(real_job, 1, work, "load1")
    size = sizes(work / "store", "reads")
    saved = load_result(work, "save", 0)["params"]
    out: dict = {"checkpoint_bytes": size["total"], "files": len(size["files"])}
    for phase, world_size in (("load2", 2), ("load1", 1)):
        ranks = []
        for rank in range(world_size):
            result = load_result(work, phase, rank)
            same = all(torch.equal(result["params"][n], t) for n, t in saved.items())
            ranks.append({**summary(result["reads"], size, world_size, rank), "values_equal": same,
                          "load_s": result["seconds"]})
        out[f"2_to_{world_size}"] = ranks
    return out


# ---------------------------------------------------------------------------------------------- simulated ranks


def as_rank(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def simulated_state(cfg, rank: int, world_size: int) -> tuple[object, dict]:
    """Rank `rank`'s FSDP2 model + AdamW state of 64, on a fake process group (the moments filled with
    values of their own, so that a load that took the wrong chunk shows)."""
    from torch.distributed.device_mesh import init_device_mesh

    from raytrainer.model import Transformer
    from raytrainer.train import fsdp

    as_rank(rank, world_size)
    torch.manual_seed(cfg.train.seed)
    # Meshes that compare equal are shared by the DTensors built on them, and equality ignores the rank: a
    # mesh named after its simulated rank keeps each rank's DTensors on its own coordinate.
    original = fsdp.init_device_mesh
    fsdp.init_device_mesh = lambda device, shape, mesh_dim_names: init_device_mesh(
        device, shape, mesh_dim_names=(f"dp{rank}",))
    try:
        strategy = fsdp.FSDPStrategy(cfg, Transformer(cfg.model), rank, world_size)
    finally:
        fsdp.init_device_mesh = original
    state = strategy._checkpoint_state(None)
    g = torch.Generator().manual_seed(rank)
    for entry in state["optim"]["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            local = entry[key].to_local()
            local.copy_(torch.rand(local.shape, generator=g))
    return strategy, state


def local_tensors(state: dict) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
            for k, v in flat.items() if torch.is_tensor(v)}


def simulated(work: Path, world_size: int) -> dict:
    """Write the checkpoint as `world_size` ranks would (DCP's save steps, one rank after another), commit
    each rank's files, then read it back as each rank would."""
    import torch.distributed.checkpoint as dcp

    from raytrainer.checkpoint import dcp_io
    from raytrainer.checkpoint.manager import MODEL_DIR, STATE_FILE
    from raytrainer.checkpoint.rng import rng_state
    from raytrainer.checkpoint.store import CheckpointStore

    cfg = config(work / "store", "reads64")
    staging = work / "dcp"
    planners, writers, plans, saved = [], [], [], []
    t0 = time.perf_counter()
    for rank in range(world_size):
        _, state = simulated_state(cfg, rank, world_size)
        planner, writer = dcp_io.LayoutSavePlanner(), dcp_io.LayoutWriter(str(staging))
        planner.set_up_planner(state, writer.storage_meta(), rank == 0)
        writer.set_up_storage_writer(rank == 0, rank=rank, use_collectives=True)
        plans.append(writer.prepare_local_plan(planner.create_local_plan()))
        planners.append(planner)
        writers.append(writer)
        saved.append(local_tensors(state))
    global_plans, metadata = planners[0].create_global_plan(plans)
    global_plans = writers[0].prepare_global_plan(global_plans)
    results = []
    for rank in range(world_size):
        future = writers[rank].write_data(planners[rank].finish_plan(global_plans[rank]), planners[rank])
        future.wait()
        results.append(future.value())
    writers[0].finish(metadata, results)
    planners.clear()
    writers.clear()

    store = CheckpointStore(cfg.checkpoint.storage, cfg.run.name)
    for rank in range(world_size):
        rank_dir = work / f"rank-{rank:05d}"
        (rank_dir / MODEL_DIR).mkdir(parents=True)
        for path in staging.iterdir():
            if path.name.startswith(f"__{rank}_") or (rank == 0 and path.name == dcp_io.METADATA_FILE):
                shutil.move(path, rank_dir / MODEL_DIR / path.name)
        (rank_dir / "rng").mkdir()
        (rank_dir / "rng" / f"rank-{rank:05d}.json").write_text(json.dumps(rng_state()))
        if rank == 0:
            (rank_dir / STATE_FILE).write_text(json.dumps({"step": STEP, "cursor": {}}))
        store.save_rank(STEP, rank_dir, rank, world_size, delete_local=True)
    save_s = time.perf_counter() - t0
    size = sizes(work / "store", "reads64")

    counter = Counter().install()
    ranks = []
    for rank in range(world_size):
        strategy, state = simulated_state(cfg, rank, world_size)
        local = work / f"load-{rank:05d}"
        rng_name = f"rng/rank-{rank:05d}.json"
        counter.active = True
        # the manager's two downloads: what says which files are needed, then those files
        first = {STATE_FILE, rng_name, f"{MODEL_DIR}/{dcp_io.METADATA_FILE}"}
        loaded = store.download(STEP, local, select=first.__contains__)
        names = [rel[len(MODEL_DIR) + 1:] for rel in size["files"] if rel.startswith(MODEL_DIR + "/")]
        needed = {f"{MODEL_DIR}/{n}" for n in strategy.files_for_rank(local / MODEL_DIR, names, world_size)}
        store.download(STEP, local, select=(needed - set(loaded.files)).__contains__)
        counter.active = False
        reads = counter.take()
        # the files fetched are enough: load this rank's state from them alone
        for entry in state["optim"]["state"].values():
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key].to_local().zero_()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, storage_reader=dcp_io.SafeFileSystemReader(str(local / MODEL_DIR)),
                     planner=dcp_io.SafeLoadPlanner(), no_dist=True)
        after = local_tensors(state)
        equal = after.keys() == saved[rank].keys() and all(torch.equal(after[k], v) for k, v in saved[rank].items())
        ranks.append({**summary(reads, size, world_size, rank), "values_equal": equal})
        shutil.rmtree(local)
    store.close()
    fractions = [r["fraction"] for r in ranks]
    return {
        "simulated": True, "world_size": world_size, "checkpoint_bytes": size["total"],
        "metadata_file_bytes": size["files"][f"{MODEL_DIR}/{dcp_io.METADATA_FILE}"],
        "files": len(size["files"]), "save_s": save_s,
        "max_fraction": max(fractions), "median_fraction": statistics.median(fractions),
        "max_shard_fraction": max(r["shard_fraction"] for r in ranks),
        "min_target_fraction": min(r["target_fraction"] for r in ranks),
        "all_within_target": all(r["fraction"] <= r["target_fraction"] for r in ranks),
        "all_values_equal": all(r["values_equal"] for r in ranks),
        "max_files_per_rank": max(r["files"] for r in ranks),
        "ranks": ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=64, help="simulated world size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="checkpoint-reads-"))
    try:
        two = real(work / "real")
        many = simulated(work / "sim", args.ranks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "name": "checkpoint_reads", "model": MODEL, "real": two, f"simulated_{args.ranks}": many,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_reads.json").write_text(json.dumps(result, indent=2) + "\n")
    mb = two["checkpoint_bytes"] / 1e6
    for rank in two["2_to_2"]:
        print(f"real 2 -> 2, rank {rank['rank']}: read {rank['fraction']:.3f} of {mb:.1f} MB "
              f"(shards {rank['shard_fraction']:.3f}, metadata {rank['metadata_bytes'] / 1e3:.0f} kB; target "
              f"≤ {rank['target_fraction']:.3f}); values equal: {rank['values_equal']}")
    alone = two["2_to_1"][0]
    print(f"real 2 -> 1: read {alone['fraction']:.3f}; values equal: {alone['values_equal']}")
    print(f"simulated {args.ranks} ranks ({many['checkpoint_bytes'] / 1e6:.1f} MB, .metadata "
          f"{many['metadata_file_bytes'] / 1e3:.0f} kB): max {many['max_fraction']:.4f}, median "
          f"{many['median_fraction']:.4f} of the checkpoint per rank (shards at most "
          f"{many['max_shard_fraction']:.4f}; 1.5/W = {1.5 / args.ranks:.4f}); within target: "
          f"{many['all_within_target']}; values equal: {many['all_values_equal']}; at most "
          f"{many['max_files_per_rank']} files per rank")
    print(f"max_rank_read_fraction_{args.ranks}_simulated: {many['max_fraction']:.4f}")


if __name__ == "__main__":
    main()

"""What a rank reads of a checkpoint on resume: its own shards plus metadata, not the whole checkpoint.

Every byte a rank reads from the checkpoint store goes through `Storage`; the spawned ranks count them per
call. An FSDP2 model + AdamW (+ EMA) saved on 2 ranks through the CheckpointManager loads on 2 ranks
(each reading at most 1.5/2 of the checkpoint plus its metadata) and on 1 (which must read everything),
with the saved values in both cases; DeepSpeed ranks read their own partitions only.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from raytrainer.checkpoint import deepspeed_io
from raytrainer.checkpoint.manager import CheckpointManager, TrainerState, all_ranks_agree
from raytrainer.checkpoint.store import CheckpointStore
from strategy_harness import build, load_result, probe_logits, save_result, spawn, tiny_config, train_steps

STEP = 3


def reads_config(out_dir: Path, strategy: str = "fsdp", *extra: str):
    return tiny_config(strategy, f"checkpoint.storage={out_dir / 'store'}",
                       "run.name=reads", "checkpoint.async_upload=false", *extra)


def broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def count_reads(calls: list[tuple[str, int]]) -> None:
    """Record (uri, bytes) for every read through Storage in this process: read_chunks (under
    download_file and hash_file) and read_bytes (commit records, JSON) are the only two ways in."""
    from raytrainer.storage import Storage

    read_bytes, read_chunks = Storage.read_bytes, Storage.read_chunks

    def counted_read_bytes(self, rel):
        data = read_bytes(self, rel)
        calls.append((self.uri(rel), len(data)))
        return data

    def counted_read_chunks(self, rel, *args, **kwargs):
        for chunk in read_chunks(self, rel, *args, **kwargs):
            calls.append((self.uri(rel), len(chunk)))
            yield chunk

    Storage.read_bytes, Storage.read_chunks = counted_read_bytes, counted_read_chunks


def full_state(strategy) -> dict[str, torch.Tensor]:
    """Model + optimizer state as whole tensors (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(strategy.module, strategy.optimizer,
                                        options=StateDictOptions(full_state_dict=True))
    out = {f"model.{k}": v.detach().clone() for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for key, value in state.items():
            out[f"optim.{fqn}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def run_manager(rank: int, world_size: int, out_dir: Path, phase: str, strategy_name: str,
                overrides: tuple[str, ...] = ("train.ema_decay=0.9",)) -> None:
    from torch.distributed.tensor import DTensor

    cfg = reads_config(out_dir, strategy_name, *overrides)
    strategy, engine = build(cfg, rank, world_size)
    env = SimpleNamespace(rank=rank, world_size=world_size, broadcast=broadcast, agree=all_ranks_agree)
    store = CheckpointStore(cfg.checkpoint.storage, cfg.run.name)
    manager = CheckpointManager(cfg, env, store=store, staging_root=out_dir / f"staging-{phase}")
    if phase == "save":
        train_steps(engine, cfg, range(STEP), rank, world_size)
        manager.save(TrainerState(step=STEP, cursor={"batch": STEP}), engine)
        calls: list[tuple[str, int]] = []
    else:
        calls = []
        before = probe_logits(strategy, cfg)
        count_reads(calls)
        state = manager.load(STEP, engine)
        assert state.step == STEP and state.cursor == {"batch": STEP}
    ema = {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
           for n, t in (engine.ema.state_dict().items() if engine.ema is not None else ())}
    result = {"logits": probe_logits(strategy, cfg), "ema": ema, "reads": calls}
    if phase != "save":
        result["before"] = before
    if strategy_name == "fsdp":
        result["state"] = full_state(strategy)
    save_result(out_dir, phase, rank, result)
    manager.finish()
    store.close()


def checkpoint_files(out_dir: Path) -> tuple[dict[str, int], int]:
    """{relative path: size} of the committed files, and the bytes of the commit records."""
    store = CheckpointStore(str(out_dir / "store"), "reads")
    records = store.records(STEP)
    files = {rel: entry["size"] for record in records.values() for rel, entry in record.files.items()}
    record_bytes = sum(len(record.to_json()) for record in records.values())
    return files, record_bytes


def assert_same_values(loaded: dict, saved: dict) -> None:
    assert not torch.equal(loaded["before"], saved["logits"])  # the load changed something
    assert torch.equal(loaded["logits"], saved["logits"])
    assert loaded["ema"].keys() == saved["ema"].keys()
    for name, value in saved["ema"].items():
        assert torch.equal(loaded["ema"][name], value), name
    if "state" in saved:
        assert loaded["state"].keys() == saved["state"].keys()
        for key, value in saved["state"].items():
            assert torch.equal(loaded["state"][key], value), key


@pytest.mark.slow
def test_fsdp_ranks_read_their_own_shards_and_one_rank_reads_all(tmp_path):
    spawn(run_manager, 2, tmp_path, "save", "fsdp")
    spawn(run_manager, 2, tmp_path, "load2", "fsdp")
    spawn(run_manager, 1, tmp_path, "load1", "fsdp")
    files, record_bytes = checkpoint_files(tmp_path)
    size = sum(files.values())
    metadata = sum(s for rel, s in files.items() if not rel.endswith(".distcp")) + record_bytes
    saved = load_result(tmp_path, "save", 0)

    for rank in range(2):
        loaded = load_result(tmp_path, "load2", rank)
        read = sum(n for _, n in loaded["reads"])
        assert read <= 1.5 / 2 * size + metadata, (rank, read, size, metadata)
        touched = {uri.rsplit("/step_00000003/", 1)[-1] for uri, _ in loaded["reads"]}
        other = f"model/__{1 - rank}_0.distcp"
        assert other in files and other not in touched, sorted(touched)
        assert f"model/__{rank}_0.distcp" in touched
        assert_same_values(loaded, saved)

    # 2 -> 1: the one rank needs every shard and still gets the saved values
    alone = load_result(tmp_path, "load1", 0)
    touched = {uri.rsplit("/step_00000003/", 1)[-1] for uri, _ in alone["reads"]}
    assert {rel for rel in files if rel.startswith("model/")} <= touched
    assert sum(n for _, n in alone["reads"]) >= size - sum(s for rel, s in files.items() if rel.startswith("rng/"))
    assert_same_values(alone, saved)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("train.ema_decay=0.9",), ("parallel.zero_stage=3",)],
                         ids=["zero2-ema", "zero3"])
def test_deepspeed_ranks_read_their_own_partitions(tmp_path, overrides):
    spawn(run_manager, 2, tmp_path, "save", "deepspeed", overrides)
    spawn(run_manager, 2, tmp_path, "load2", "deepspeed", overrides)
    files, _ = checkpoint_files(tmp_path)
    saved = load_result(tmp_path, "save", 0)
    for rank in range(2):
        loaded = load_result(tmp_path, "load2", rank)
        touched = {uri.rsplit("/step_00000003/", 1)[-1] for uri, _ in loaded["reads"]}
        others = {rel for rel in files if f"zero_pp_rank_{1 - rank}_" in rel}
        assert others and not others & touched, sorted(touched)
        assert any(f"zero_pp_rank_{rank}_" in rel for rel in touched)
        assert_same_values(loaded, saved)


def test_deepspeed_files_for_rank_keeps_shared_files_and_this_ranks_partitions():
    names = ["latest", "extra.safetensors", "zero/mp_rank_00_model_states.pt",
             "zero/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "zero/zero_pp_rank_10_mp_rank_00_model_states.pt", "zero/zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert deepspeed_io.files_for_rank(names, 1, 11, 11) == {
        "latest", "extra.safetensors", "zero/mp_rank_00_model_states.pt",
        "zero/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero/zero_pp_rank_1_mp_rank_00_model_states.pt"}
    # another world size: the universal conversion reads every rank's partitions
    assert deepspeed_io.files_for_rank(names, 1, 11, 4) == set(names)


def test_manager_reads_everything_for_an_engine_that_cannot_name_its_files(tmp_path):
    cfg = reads_config(tmp_path, "ddp")
    store = CheckpointStore(cfg.checkpoint.storage, cfg.run.name)
    stage = tmp_path / "stage"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "blob.bin").write_bytes(b"x" * 100)
    (stage / "trainer_state.json").write_text(json.dumps({"step": 1, "cursor": {}}))
    store.save_rank(1, stage, 0, 1)

    class PlainEngine:
        seen: list[str] = []

        def load_checkpoint(self, directory, saved_world_size):
            self.seen = sorted(p.name for p in Path(directory).iterdir())

        def load_state_dict(self, state):
            pass

    env = SimpleNamespace(rank=0, world_size=1, broadcast=lambda x: x, agree=lambda ok: ok)
    engine = PlainEngine()
    assert CheckpointManager(cfg, env, store=store, staging_root=tmp_path / "s").load(1, engine).step == 1
    assert engine.seen == ["blob.bin"]

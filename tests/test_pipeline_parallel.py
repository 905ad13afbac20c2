"""Pipeline parallel (parallel.pp) on gloo ranks: the same losses, gradients, evaluations and checkpoints as one
process, for GPipe, 1F1B and interleaved 1F1B, alone (pp=2) and with data parallel (dp2 x pp2); micro-batches
run in the order each schedule says; checkpoints move between pipeline and data-parallel meshes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from raytrainer.config import ConfigError
from raytrainer.train.pipeline import rank_stages, stage_layers
from strategy_harness import (
    assert_follows_the_reference,
    assert_same_gradients,
    build,
    curve_run,
    load_as_a_resume_would,
    load_result,
    merge_rank_dirs,
    probe_batch,
    save_result,
    single_process_curve,
    spawn,
    tiny_config,
    train_steps,
)

STEPS = range(4)  # steps 2 and 3 are in the second curriculum phase (twice the micro-batches)
UNTIED_4_LAYERS = ["model.n_layers=4", "model.tie_embeddings=false"]


def pp_config(pp: int, workers: int, schedule: str = "1f1b", *overrides: str, strategy: str = "ddp"):
    per_rank = 2 if schedule == "interleaved_1f1b" else 1
    return tiny_config(strategy, *UNTIED_4_LAYERS, f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}",
                       f"parallel.pp_stages_per_rank={per_rank}", f"parallel.min_workers={workers}",
                       f"parallel.max_workers={workers}", *overrides)


# ---------------------------------------------------------------------------------------------- layout


def test_stages_take_equal_runs_of_layers_and_ranks_hold_looped_stages():
    assert [list(stage_layers(8, 4, s)) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_stages(pp=2, stages_per_rank=1, pp_rank=1) == [1]
    assert rank_stages(pp=2, stages_per_rank=2, pp_rank=0) == [0, 2]
    assert rank_stages(pp=4, stages_per_rank=2, pp_rank=3) == [3, 7]


@pytest.mark.parametrize("overrides,message", [
    (["parallel.pp=2", "parallel.max_workers=3"], r"parallel.max_workers=3 is not a multiple of parallel.pp=2"),
    (["parallel.pp=2", "parallel.max_workers=2", "model.n_layers=3"],
     r"model.n_layers=3 does not split into parallel.pp x parallel.pp_stages_per_rank=2 stages"),
    (["parallel.pp=2", "parallel.max_workers=2", "model.tie_embeddings=true"],
     r"model.tie_embeddings with parallel.pp=2 is not supported"),
    (["parallel.pp=2", "parallel.max_workers=2", "parallel.strategy=deepspeed"],
     r"parallel.strategy=deepspeed with parallel.pp=2 is not supported"),
    (["parallel.pp=2", "parallel.max_workers=2", "model.mtp_heads=1"], r"model.mtp_heads with parallel.pp=2"),
    (["parallel.pp=2", "parallel.max_workers=2", "parallel.pp_schedule=interleaved_1f1b"],
     r"interleaved_1f1b needs parallel.pp_stages_per_rank >= 2"),
    (["parallel.pp_stages_per_rank=2"], r"parallel.pp_stages_per_rank=2 needs parallel.pp_schedule=interleaved_1f1b"),
    # 192 tokens of 32: 6 rows, micro-batches of 4 rows: 2 per step, fewer than 4 stages
    (["parallel.pp=4", "parallel.min_workers=4", "parallel.max_workers=4", "train.micro_batch_size=4"],
     r"parallel.pp_schedule=1f1b needs at least parallel.pp=4 micro-batches per step, but a replica takes 2"),
    # 5 micro-batches on 2 stages: 2 rounds of 2 leave one over
    (["parallel.pp=2", "parallel.max_workers=2", "parallel.pp_schedule=interleaved_1f1b",
      "parallel.pp_stages_per_rank=2", "train.global_batch_tokens=320", "data.phases=[{start_step: 0}]"],
     r"a replica would take 5 per step, not a multiple of 2 rounds"),
    # the loss is computed at the last stage: a loss fault on the first would never fire
    (["parallel.pp=2", "parallel.max_workers=2", "faults=[{step: 1, kind: nan_loss, rank: 0}]"],
     r"faults: nan_loss at step 1 on rank 0, which holds pipeline stage 0; .* last stage.s ranks \(1, 3, ...\)"),
])
def test_pipeline_settings_are_checked_with_named_errors(overrides, message):
    base = [o for o in [*UNTIED_4_LAYERS, "parallel.min_workers=2"]
            if not any(o.split("=")[0] == x.split("=")[0] for x in overrides)]
    with pytest.raises(ConfigError, match=message):
        tiny_config("ddp", *base, *overrides)


def test_a_pipeline_replica_is_tp_times_pp_consecutive_ranks():
    from raytrainer.train.mesh import ParallelDims

    dims = ParallelDims(8, pp=2, tp=2)
    assert dims.dp == 2 and dims.replica_size == 4
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [dims.pp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [dims.reads_rows(r) for r in range(8)] == [True, False, False, False] * 2
    assert [dims.holds_losses(r) for r in range(8)] == [False, False, True, False] * 2
    cfg = pp_config(2, 8, "gpipe")  # 6 rows for 4 replicas: one micro-batch each, enough for GPipe
    assert cfg.parallel.max_replicas == 4


# ---------------------------------------------------------------------------------------------- equivalence


def run_curve(rank: int, world_size: int, out_dir, pp: int, schedule: str, strategy: str, tp: int) -> None:
    cfg = pp_config(pp, world_size, schedule, f"parallel.tp={tp}", strategy=strategy)
    save_result(out_dir, "run", rank, curve_run(cfg, rank, world_size, STEPS)[0])


@pytest.fixture(scope="module")
def reference() -> dict:
    return single_process_curve(tiny_config("ddp", *UNTIED_4_LAYERS), STEPS)[0]


@pytest.mark.slow
@pytest.mark.parametrize("world_size,pp,schedule,strategy,tp", [
    (2, 2, "gpipe", "ddp", 1), (2, 2, "1f1b", "ddp", 1), (2, 2, "interleaved_1f1b", "ddp", 1), (4, 2, "1f1b", "ddp", 1),
    (4, 2, "1f1b", "fsdp", 1), (4, 2, "1f1b", "fsdp", 2),
], ids=["pp2-gpipe", "pp2-1f1b", "pp2-interleaved", "dp2xpp2-1f1b", "fsdp-dp2xpp2", "pp2xtp2"])
def test_pipeline_follows_the_single_process_curve(world_size, pp, schedule, strategy, tp, reference, tmp_path):
    spawn(run_curve, world_size, tmp_path, pp, schedule, strategy, tp)
    runs = [load_result(tmp_path, "run", rank) for rank in range(world_size)]
    assert_follows_the_reference(runs, reference)
    # every parameter's gradient is on exactly the stage holding it: the ranks of one pipeline cover the model
    pipeline = {}
    for run in runs[:pp * tp:tp]:
        assert not pipeline.keys() & run["grads"].keys()
        pipeline.update(run["grads"])
    assert_same_gradients(pipeline, reference["grads"])


# ---------------------------------------------------------------------------------------------- schedules


def run_order(rank: int, world_size: int, out_dir, schedule: str) -> None:
    from torch.distributed.pipelining.stage import _PipelineStageBase

    order = []
    forward, backward = _PipelineStageBase.forward_one_chunk, _PipelineStageBase.backward_one_chunk

    def record_forward(self, chunk, *args, **kwargs):
        order.append(f"F{chunk}" if len(engine.strategy.pipeline.stage_ids) == 1 else f"F{chunk}s{self.stage_index}")
        return forward(self, chunk, *args, **kwargs)

    def record_backward(self, chunk, *args, **kwargs):
        order.append(f"B{chunk}" if len(engine.strategy.pipeline.stage_ids) == 1 else f"B{chunk}s{self.stage_index}")
        return backward(self, chunk, *args, **kwargs)

    _PipelineStageBase.forward_one_chunk, _PipelineStageBase.backward_one_chunk = record_forward, record_backward
    # 256 tokens of 32: 8 rows, 4 micro-batches of 2
    cfg = pp_config(2, world_size, schedule, "train.global_batch_tokens=256", "data.phases=[{start_step: 0}]")
    _, engine = build(cfg, rank, world_size)
    order.clear()  # only the step's own calls
    train_steps(engine, cfg, [0], rank, world_size)
    save_result(out_dir, "order", rank, order)


@pytest.mark.slow
def test_each_schedule_runs_micro_batches_in_its_own_order(tmp_path):
    orders = {}
    for schedule in ("gpipe", "1f1b"):
        spawn(run_order, 2, tmp_path / schedule, schedule)
        orders[schedule] = [load_result(tmp_path / schedule, "order", r) for r in range(2)]
    # GPipe: every forward, then every backward: four micro-batches' activations held at once
    assert orders["gpipe"] == [["F0", "F1", "F2", "F3", "B0", "B1", "B2", "B3"]] * 2
    # 1F1B: the first stage runs ahead by the pipeline's depth, then alternates; never more than 2 in flight
    assert orders["1f1b"] == [["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"],
                              ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]]


# ---------------------------------------------------------------------------------------------- checkpoints


def run_between_meshes(rank: int, world_size: int, out_dir) -> None:
    """pp2 trains and saves; dp2 loads it, then trains and saves; pp2 loads that. Both continue from each."""
    results = {}
    for name, pp, source in (("pp2", 2, None), ("dp2", 1, "pp2"), ("pp2-again", 2, "dp2")):
        cfg = pp_config(pp, world_size)
        _, engine = build(cfg, rank, world_size)
        if source is None:
            train_steps(engine, cfg, [0, 1, 2], rank, world_size)
        else:
            load_as_a_resume_would(engine, out_dir, source, name, rank, world_size)
            if pp == 1:  # the pipeline's weights, whole on one rank
                with torch.no_grad():
                    results["dp2-logits"] = engine.strategy.module(probe_batch(cfg)).logits.clone()
        engine.save_checkpoint(out_dir / name / f"rank{rank}")
        dist.barrier()
        results[name] = torch.tensor(train_steps(engine, cfg, [3, 4], rank, world_size))
    save_result(out_dir, "meshes", rank, results)


@pytest.mark.slow
def test_checkpoints_move_between_pipeline_and_data_parallel_meshes(tmp_path):
    spawn(run_between_meshes, 2, tmp_path)
    results = load_result(tmp_path, "meshes")
    for other in ("dp2", "pp2-again"):  # the same model and optimizer state on another mesh: the same way on
        torch.testing.assert_close(results[other], results["pp2"], rtol=1e-5, atol=1e-6)

    # one process (export, generate) reads the pipeline's checkpoint whole
    from raytrainer.model import Transformer
    from raytrainer.train.strategies import load_full_state_dict

    cfg = pp_config(2, 2)
    merged = merge_rank_dirs(sorted((tmp_path / "pp2").iterdir()), tmp_path / "merged-export")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    state = load_full_state_dict(cfg, model, merged)
    assert {k for k in state if k.startswith("layers.")} == {k for k in model.state_dict() if k.startswith("layers.")}
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(probe_batch(cfg)).logits, results["dp2-logits"], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_keyed_by_param_group_still_loads(tmp_path):
    """Checkpoints written before the optimizer was keyed by parameter name (its state under param groups)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from raytrainer.checkpoint import dcp_io

    cfg = tiny_config("ddp")
    strategy, engine = build(cfg, 0, 1)
    train_steps(engine, cfg, [0], 0, 1)
    model_sd, optim_sd = get_state_dict(strategy.module, strategy.optimizer)  # the old layout
    dcp_io.save({"model": model_sd, "optim": optim_sd}, tmp_path / "old")
    old_keys = dcp_io.read_metadata(tmp_path / "old").state_dict_metadata
    assert any(k.startswith("optim.param_groups.0.") for k in old_keys)
    engine.save_checkpoint(tmp_path / "new")
    expected = torch.tensor(train_steps(engine, cfg, [1, 2], 0, 1))

    for layout in ("old", "new"):
        _, again = build(cfg, 0, 1)
        again.load_checkpoint(tmp_path / layout, saved_world_size=1)
        torch.testing.assert_close(torch.tensor(train_steps(again, cfg, [1, 2], 0, 1)), expected, rtol=0, atol=0)

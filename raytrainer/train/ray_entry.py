"""The Ray Train worker function: where Ray meets the loop (get_context, report, the guardian handle)."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from pydantic import SecretStr

from raytrainer.checkpoint.manager import all_ranks_agree, run_store
from raytrainer.checkpoint.ray_pointers import read_pointer, registered_dir_name, write_pointer
from raytrainer.config import Config, with_secrets
from raytrainer.fault.preemption import StopNotice
from raytrainer.train.loop import NoGuardian, Trainer, WorkerEnv, gather_objects, set_worker_threads
from raytrainer.train.ray_notice import ray_drain_notice, watch_for_stop

log = logging.getLogger("raytrainer.train")


def broadcast_from_rank0(obj):
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def group_broadcast(mesh) -> Callable[[Any], Any]:
    """The first rank's object to every rank of a one-dimensional mesh (a replica's ranks)."""
    group, first = mesh.get_group(), mesh.mesh[0].item()

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=first, group=group)
        return box[0]

    return broadcast


def every_ranks_node() -> list[str]:
    """The Ray node id of every rank, in rank order: how the guardian names (and excludes) a suspect node."""
    import ray

    return [str(n) for n in gather_objects(ray.get_runtime_context().get_node_id())]


def build_trainer(cfg: Config, env: WorkerEnv, device: torch.device, guardian=None, store=None,
                  data_in_process: bool = False) -> Trainer:
    """Everything one worker needs, from the config alone (plus its place in the world). `data_in_process`:
    batches made in this process even with Ray initialised (a sweep's trial), not by the Ray Data pipeline."""
    from raytrainer.checkpoint.manager import CheckpointManager
    from raytrainer.data.feed import DataFeed
    from raytrainer.fault.injection import FaultInjector
    from raytrainer.fault.watchdog import StepWatchdog
    from raytrainer.model import Transformer
    from raytrainer.train.engine import StepEngine
    from raytrainer.train.strategies import build_strategy

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every strategy
    model = Transformer(cfg.model)
    # model.init_state=full loads the whole source checkpoint where a resume would (Trainer.restore).
    if (cfg.model.init_from is not None and cfg.model.init_state == "weights"
            and (store or run_store(cfg)).latest_complete() is None):
        from raytrainer.warm_start import warm_start

        warm_start(cfg, model, env.rank)  # a run with a checkpoint of its own resumes from that instead
    if cfg.model.lora is not None:
        from raytrainer.warm_start import add_adapters

        add_adapters(cfg, model, env.rank)
    strategy = build_strategy(cfg, model, env.rank, env.world_size, device)
    engine = StepEngine(strategy.model, cfg, strategy)
    checkpoints = CheckpointManager(cfg, env, store=store)
    # Data-parallel replicas split every global batch; the ranks of a replica (tensor-parallel ranks, pipeline
    # stages) share their rows, which the replica's first rank reads and sends to the others.
    dims = strategy.dims
    replica, replicas = dims.dp_rank(env.rank), dims.dp
    share = group_broadcast(strategy.mesh["replica"]) if dims.replica_size > 1 else None

    def feed_factory(cursor: dict | None) -> DataFeed:
        return DataFeed(cfg, cfg.data.path, replica, replicas, cursor=cursor,
                        use_ray=False if data_in_process else None, share=share, reads=dims.reads_rows(env.rank))

    injector = None
    if cfg.faults:
        injector = FaultInjector(cfg, env.rank, hooks=env.hooks, model=strategy.model)
        injector.attach_engine(engine, strategy.module)
    validation = None
    if cfg.eval.every_steps is not None:
        from raytrainer.data.validation import ValidationBatches

        validation = ValidationBatches(cfg, replica, replicas)
    recorder = None
    if env.rank == 0:
        from raytrainer.metrics.setup import open_recorder

        recorder = open_recorder(cfg)
    watchdog = StepWatchdog(cfg.guardian.step_timeout_s, env.rank) if cfg.guardian.enabled else None
    return Trainer(
        cfg,
        env,
        engine,
        feed_factory,
        checkpoints,
        guardian or NoGuardian(),
        injector=injector,
        watchdog=watchdog,
        recorder=recorder,
        validation=validation,
    )


def quiet_worker_logs(verbose: bool) -> None:
    """The driver speaks for the run (its live view draws what rank 0 announces): workers print only
    warnings and errors, theirs and Ray's, unless run.verbose is set."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("raytrainer").setLevel(level)
    if not verbose:
        # Ray Train logs every report (a barrier) at INFO, and Ray Data warns that progress bars are off.
        for name in ("ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)


def train_fn(loop_config: dict, secrets: SecretStr | None = None) -> None:
    """Ray Train `train_loop_per_worker`. `loop_config["config"]` is the redacted config; `secrets` (JSON of
    `secret_values`, bound by the driver) puts the credentials back."""
    import ray.train

    values = json.loads(secrets.get_secret_value()) if secrets is not None else {}
    cfg = Config.model_validate(with_secrets(loop_config["config"], values))
    quiet_worker_logs(cfg.run.verbose)
    ctx = ray.train.get_context()
    set_worker_threads(cfg, ctx.get_local_world_size())
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.parallel.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    store = run_store(cfg)  # one store for the loop's checkpoints and the pointers reported to Ray

    def report(metrics: dict, checkpoint_step: int | None = None) -> None:
        # A report is a barrier in Ray Train V2, so every rank calls it at the same steps.
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        if checkpoint_step is None:
            ray.train.report(scalars)
            return
        with tempfile.TemporaryDirectory(prefix="raytrainer-pointer-") as pointer:
            write_pointer(pointer, store, checkpoint_step)
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(pointer),
                             checkpoint_dir_name=registered_dir_name(checkpoint_step))

    from raytrainer.live.monitor import ForwardToDriver, announcer, pause_requests

    rank = ctx.get_world_rank()
    announce = announcer(cfg.run.name)
    if announce is not None and not cfg.run.verbose:
        logging.getLogger().addHandler(ForwardToDriver(announce, rank))
    notice = StopNotice(sources=(ray_drain_notice,))
    restore_sigterm = watch_for_stop(notice) if cfg.checkpoint.on_preemption else (lambda: None)
    hooks = {}
    if any(f.kind == "s3_outage" for f in cfg.faults):
        from raytrainer.fault.outage import outage_hook

        hooks["s3_outage"] = outage_hook(cfg.run.name)
    env = WorkerEnv(
        rank=rank,
        notice=notice.reason,
        **({"pause_request": pause_requests(cfg.run.name)} if rank == 0 else {}),
        hooks=hooks,
        world_size=ctx.get_world_size(),
        report=report,
        broadcast=broadcast_from_rank0,
        agree=all_ranks_agree,
        registers_checkpoints=True,
        nodes=every_ranks_node(),
        **({"announce": announce} if announce is not None and rank == 0 else {}),
    )
    registered = read_pointer(ray.train.get_checkpoint())
    if registered is not None and env.rank == 0:
        log.info("Ray Train's latest registered checkpoint is step %d (%s); resuming from the store's latest "
                 "complete one", registered["step"], registered["url"])
    guardian = None
    if cfg.guardian.enabled and env.rank == 0:
        from raytrainer.fault.guardian_actor import GuardianClient

        guardian = GuardianClient.connect(cfg.run.name)
    trainer = build_trainer(cfg, env, device, guardian=guardian, store=store)
    try:
        result = trainer.fit()
    finally:
        restore_sigterm()
    log.info("rank %d finished at step %d", env.rank, result["step"])

"""The job driver: checks everything that can be checked before a GPU-hour is spent, then runs Ray Train.

Order matters: config (already validated) -> storage preflight -> the run's directory (run.resume) and a
refusal to resume a run its guardian aborted (run.resume_after_abort) -> Ray -> dataset validation ->
capacity check -> the run's config on record -> guardian actor -> TorchTrainer.fit(). Any failure before fit()
names what is wrong in one line (exit status 2); a guardian abort ends fit() without a restart and run() raises
GuardianAbort with the incident report.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import SecretStr

from raytrainer.config import Config, ConfigError, secret_values, to_dict

log = logging.getLogger("raytrainer.launch")

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
RAY_STORAGE_ATTEMPTS = 7  # the SDK backs off 1, 2, 4 ... s between attempts: about a minute in all


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    # Read by the Ray Train controller: a worker group that cannot be placed fails with a reason
    # after this long instead of waiting forever. Elastic runs shorten it for restarts (raytrainer.elastic).
    os.environ.setdefault(START_TIMEOUT_ENV, str(int(cfg.parallel.worker_start_timeout_s)))
    address = cfg.run.address or os.environ.get("RAY_ADDRESS")
    # Quiet by default: the driver speaks for the run. Workers' warnings and errors come through the run's
    # monitor (raytrainer.live); Ray's own logs stay in its session directory (/tmp/ray/session_latest/logs).
    # run.verbose streams every process's output here, as Ray does by default.
    quiet = {} if cfg.run.verbose else {"logging_level": logging.ERROR, "configure_logging": True}
    log_to_driver = cfg.run.verbose
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, **quiet)
    else:
        # A 2-core laptop still needs room for Ray Data tasks beside the training workers. The dashboard
        # serves the state API that Ray Train's placement-group cleaner polls; without it, it warns every
        # few seconds for the whole run.
        # The raylet starts workers at most as many at once as there are cores, and warns once a job has
        # started 4x that many: on a 2-core machine the default job's driver-side actors, two trainers and
        # the data tasks are past it at once. The logical CPU count is the concurrency meant here.
        num_cpus = max(cfg.run.local_num_cpus, os.cpu_count() or 1)
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(num_cpus))
        # address="local": a Ray of the job's own. A bare init joins the cluster recorded in
        # /tmp/ray/ray_current_cluster, and fails on num_cpus, or on a dead address a killed run left there;
        # joining a cluster is said with run.address (or RAY_ADDRESS), e.g. "auto".
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 log_to_driver=log_to_driver, **quiet)


def check_capacity(cfg: Config, autoscaling: bool) -> None:
    """Fail fast when the cluster can never host parallel.min_workers.

    A local Ray (or a fixed cluster) cannot grow, so a shortfall is an error now rather than a silent
    wait; on an autoscaling cluster it is a warning, and nodes are expected to join.
    """
    import ray

    total = ray.cluster_resources()
    need_gpu = cfg.parallel.min_workers if cfg.parallel.use_gpu else 0
    need_cpu = cfg.parallel.min_workers * cfg.parallel.cpus_per_worker
    have_gpu, have_cpu = total.get("GPU", 0), total.get("CPU", 0)
    if need_gpu <= have_gpu and need_cpu <= have_cpu:
        return
    message = (
        f"parallel.min_workers={cfg.parallel.min_workers} needs {need_cpu:g} CPUs and {need_gpu} GPUs "
        f"(parallel.cpus_per_worker={cfg.parallel.cpus_per_worker}, parallel.use_gpu={cfg.parallel.use_gpu}), "
        f"but this Ray cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs"
    )
    if not autoscaling:
        raise ConfigError(message + ": lower parallel.min_workers or add nodes")
    log.warning("%s; waiting for the autoscaler to add nodes", message)


def absolute_local_paths(cfg: Config) -> Config:
    """Workers do not share the driver's working directory: hand them absolute local paths."""
    from raytrainer.data.fs import is_local

    updates = {}
    if is_local(cfg.data.path):
        updates["data"] = cfg.data.model_copy(update={"path": os.path.abspath(cfg.data.path)})
    if cfg.data.val_path and is_local(cfg.data.val_path):
        data = updates.get("data", cfg.data)
        updates["data"] = data.model_copy(update={"val_path": os.path.abspath(cfg.data.val_path)})
    if is_local(cfg.checkpoint.storage):
        updates["checkpoint"] = cfg.checkpoint.model_copy(update={"storage": os.path.abspath(cfg.checkpoint.storage)})
    if cfg.model.init_from is not None:  # hf:<dir> or run:<storage>/<run>[@step]
        scheme, where = cfg.model.init_from.split(":", 1)
        if is_local(where):
            updates["model"] = cfg.model.model_copy(update={"init_from": f"{scheme}:{os.path.abspath(where)}"})
    return cfg.model_copy(update=updates)


def ensure_sample_data(cfg: Config) -> Config:
    """The default data.path names the sample corpus: in the configured tokenizer (data/sample for the default
    job's bytes, data/sample-gpt2 for a GPT-2 preset), built on first use (seconds, nothing downloaded)."""
    from raytrainer.config import DataConfig
    from raytrainer.data.sample_corpus import make_sample_dataset, sample_path_for

    default_path = os.path.abspath(DataConfig().path)
    if cfg.data.path != default_path:
        return cfg
    path = sample_path_for(cfg.data.tokenizer, default_path)
    if path != default_path:
        log.info("data.path=%s is the sample corpus; in data.tokenizer=%s it is %s", DataConfig().path,
                 cfg.data.tokenizer, path)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": path})})
    if not os.path.exists(os.path.join(path, "manifest.json")):
        log.info("no dataset at %s: building the sample corpus from the Python standard library", path)
        make_sample_dataset(path, tokenizer=cfg.data.tokenizer)
    return cfg


def first_start_timeout_s(cfg: Config) -> float:
    """The placement timeout of a run's first start: the environment's, when one was set, else the config's."""
    try:
        return float(os.environ[START_TIMEOUT_ENV])
    except (KeyError, ValueError):
        return cfg.parallel.worker_start_timeout_s


def build_torch_trainer(cfg: Config, storage_path: str, storage_filesystem: Any):
    import ray.train
    from ray.train.torch import TorchConfig

    from raytrainer.elastic import NodeLossAwareTorchTrainer
    from raytrainer.train.ray_entry import train_fn
    from raytrainer.train.ray_failure import end_runs_on_guardian_abort

    p = cfg.parallel
    workers = p.min_workers if p.min_workers == p.max_workers else (p.min_workers, p.max_workers)
    scaling = ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=p.use_gpu,
        resources_per_worker={"CPU": p.cpus_per_worker, **({"GPU": 1} if p.use_gpu else {}), **p.extra_resources},
        **({"elastic_resize_monitor_interval_s": p.elastic_resize_interval_s} if isinstance(workers, tuple) else {}),
    )
    backend = p.backend if p.backend != "auto" else ("nccl" if p.use_gpu else "gloo")
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
    )
    # Elastic runs are sized from the nodes alive at each restart, so an abruptly lost node costs seconds,
    # not a start timeout; a fixed-size run gets Ray's own policy.
    trainer = NodeLossAwareTorchTrainer(
        # Ray Train records train_loop_config in its run state (dashboard, export events), so that copy is
        # redacted; the workers get the real keys bound to the function, which is only pickled to them.
        functools.partial(train_fn, secrets=SecretStr(json.dumps(secret_values(cfg)))),
        train_loop_config={"config": to_dict(cfg)},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend=backend),
        first_start_timeout_s=first_start_timeout_s(cfg),
        workers_per_replica=cfg.parallel.replica_size * cfg.parallel.ep,
        run_name=cfg.run.name if cfg.guardian.enabled else None,
        restart_timeout_s=p.worker_restart_timeout_s,
    )
    # A guardian abort is final, whatever parallel.max_failures says: a restart would only replay it.
    return end_runs_on_guardian_abort(trainer)


class AbortedRunError(ConfigError):
    """The run's guardian aborted it, and the resubmission does not say how to go on."""


def fresh_run(cfg: Config) -> Config:
    """run.resume=false: a run that starts at step 0. When <storage>/<run.name> already holds a run, this one
    gets its own directory, <run.name>-<UTC timestamp>; the old run is never touched."""
    from datetime import UTC, datetime

    from raytrainer.storage import open_storage

    storage = open_storage(cfg.checkpoint.storage, cfg.checkpoint.s3)
    if not storage.listdir(cfg.run.name):
        return cfg
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name, n = f"{cfg.run.name}-{stamp}", 1
    while storage.listdir(name):  # two submissions within a second
        n += 1
        name = f"{cfg.run.name}-{stamp}-{n}"
    log.info("run.resume=false: %s already holds a run, left as it is; this one starts at step 0 in %s "
             "(run.name=%s)", storage.uri(cfg.run.name), storage.uri(name), name)
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})


def check_not_aborted(cfg: Config) -> str | None:
    """The abort reason when the run's guardian aborted it (its durable state says so), else None; raises
    AbortedRunError unless run.resume_after_abort is set."""
    from raytrainer.fault.guardian_actor import read_guardian_state
    from raytrainer.storage import join

    reason = (read_guardian_state(cfg) or {}).get("aborted")
    if not reason or cfg.run.resume_after_abort:
        return reason
    where = join(cfg.checkpoint.storage, cfg.run.name, "guardian")
    raise AbortedRunError(
        f"run '{cfg.run.name}' was aborted by its guardian and is not resumed as it was: "
        f"{reason.splitlines()[0]}\n"
        f"  the whole incident report is the last 'abort' event in {where}/events.jsonl\n"
        f"  to go on from its newest checkpoint, resubmit with --set run.resume_after_abort=true, ideally with "
        f"a lower optim.lr (now {cfg.optim.lr:g}) or a higher schedule.warmup_steps (now "
        f"{cfg.schedule.warmup_steps}); to start over at step 0 instead, --set run.resume=false"
    )


def check_branch(cfg: Config) -> None:
    """model.init_state=full: a source that cannot be branched from is refused here, before any cluster work
    (a run with a checkpoint of its own resumes from that, and the source no longer matters)."""
    if cfg.model.init_state != "full":
        return
    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.warm_start import branch_point

    if CheckpointStore(cfg.checkpoint.storage, cfg.run.name, cfg.checkpoint.s3).latest_complete() is None:
        _, step, _ = branch_point(cfg)
        log.info("run %s branches from %s at step %d (model.init_state=full)", cfg.run.name, cfg.model.init_from,
                 step)


def check_dataset(cfg: Config, run_dir: Any) -> None:
    """A resumed run trains on the shards it started with: a dataset prepared again under it is refused here,
    naming the first shard that differs (data.allow_manifest_change=true goes on). Until the run has a
    checkpoint, its dataset may still change."""
    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.data.manifest import DataError, Manifest
    from raytrainer.data.run_record import check_dataset_unchanged

    resumes = CheckpointStore(cfg.checkpoint.storage, cfg.run.name, cfg.checkpoint.s3).latest_complete() is not None
    try:
        check_dataset_unchanged(run_dir, Manifest.load(cfg.data.path, cfg.data.s3), cfg.data.path,
                                allow=cfg.data.allow_manifest_change, resumes=resumes)
    except DataError as e:
        raise ConfigError(str(e)) from None


@contextmanager
def refused_before_training() -> Iterator[None]:
    """Before any worker starts, a dataset or store that cannot be used is a problem with the config that names
    it: one line and exit status 2 (run_job), not a traceback."""
    from raytrainer.data.manifest import DataError
    from raytrainer.storage import StorageError

    try:
        yield
    except (DataError, StorageError) as e:
        raise ConfigError(str(e)) from e


def run(cfg: Config) -> dict:
    """Run (or resume) the job described by cfg on the current or a local Ray cluster."""
    from raytrainer.data.validate import validate_data_config
    from raytrainer.fault.guardian_actor import start_guardian, stop_guardian
    from raytrainer.live.monitor import start_monitor, stop_monitor
    from raytrainer.live.pause import CTRL_C, pause_on_ctrl_c
    from raytrainer.live.view import Follower, LiveView
    from raytrainer.metrics.setup import check_metrics_config
    from raytrainer.report.document import write_config
    from raytrainer.storage import open_storage, preflight
    from raytrainer.train.ray_failure import guardian_abort_in

    cfg = absolute_local_paths(cfg)
    with refused_before_training():
        check_metrics_config(cfg)
        preflight(cfg.checkpoint.storage, cfg.checkpoint.s3)  # seconds, and before any cluster work
        if not cfg.run.resume:
            cfg = fresh_run(cfg)
        aborted = check_not_aborted(cfg)
        check_branch(cfg)
        run_dir = open_storage(cfg.checkpoint.storage, cfg.checkpoint.s3).child(cfg.run.name)
        init_ray(cfg)
        cfg = ensure_sample_data(cfg)
        report = validate_data_config(cfg.data, model_vocab_size=cfg.model.vocab_size)
        if report.skipped:
            log.warning("data: skipping %d bad shards (data.on_bad_shard=skip): %s", len(report.skipped),
                        "; ".join(f"{s.path}: {s.reason}" for s in report.skipped[:5]))
        check_dataset(cfg, run_dir)
        check_capacity(cfg, autoscaling=bool(cfg.run.address or os.environ.get("RAY_ADDRESS")))
    # Only a run that passed every check records its config: a refused resubmission leaves the run's own.
    write_config(run_dir, to_dict(cfg))
    if cfg.guardian.enabled:
        guardian = start_guardian(cfg)
        if aborted and guardian.resume_after_abort(
                f"resubmitted with run.resume_after_abort=true (optim.lr={cfg.optim.lr:g}, "
                f"schedule.warmup_steps={cfg.schedule.warmup_steps})"):
            log.warning("run %s: the guardian's abort is cleared (run.resume_after_abort=true), and "
                        "guardian.max_rollbacks=%d more rollbacks are allowed; going on from the newest checkpoint",
                        cfg.run.name, cfg.guardian.max_rollbacks)
    # Ray Train's controller writes its own run state there; one failed write ends the run (ControllerError), so
    # its client rides out an object-store outage of about a minute.
    storage = open_storage(cfg.checkpoint.storage, cfg.checkpoint.s3, max_attempts=RAY_STORAGE_ATTEMPTS)
    trainer = build_torch_trainer(cfg, storage.root, storage.fs)
    p = cfg.parallel
    degrees = [f"{key}={getattr(p, key)}" for key in ("tp", "pp", "cp", "ep") if getattr(p, key) > 1]
    layout = ", ".join([p.strategy, *degrees])
    log.info("training %s: %d steps on %d..%d %s workers (%s); metrics in %s", cfg.run.name, cfg.train.steps,
             p.min_workers, p.max_workers, "GPU" if p.use_gpu else "CPU", layout, storage.uri(cfg.run.name, "metrics"))
    monitor = start_monitor(cfg.run.name)
    follower = Follower(monitor, LiveView(cfg.train.steps, cfg.train.log_every)).start()
    ctrl_c = pause_on_ctrl_c(trainer, monitor, follower.view.say)
    try:
        result = trainer.fit()
    except Exception as e:
        abort = guardian_abort_in(e)
        if abort is not None:
            raise abort from None  # the incident report, without Ray's wrapping of every rank's traceback
        if not ctrl_c.stopped_at_once:
            raise
        result = None
    finally:
        ctrl_c.close()
        follower.stop()
        stop_monitor(cfg.run.name)
        if cfg.guardian.enabled:
            stop_guardian(cfg.run.name)  # flushes the events log and the guardian's state
        if cfg.metrics.report:
            write_report(cfg, run_dir)
    if ctrl_c.stopped_at_once:
        return {**summarize(cfg), "stopped": "Ctrl-C twice"}
    if result.error is not None:
        raise result.error
    summary = {**summarize(cfg), **registered_with_ray(result)}
    paused = ctrl_c.paused and (summary["step"] or 0) < cfg.train.steps
    return {**summary, "paused": CTRL_C} if paused else summary


def write_report(cfg: Config, run_dir: Any) -> None:
    """report.md and report.html into the run's storage; a report that cannot be made is a warning."""
    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.report.document import write_run_report

    try:
        store = CheckpointStore(cfg.checkpoint.storage, cfg.run.name, cfg.checkpoint.s3)
        checkpoints = [{"step": c.step, "complete": c.complete, "world_size": c.world_size, "pinned": c.pinned,
                        "problems": c.problems} for c in store.list()]
        written = write_run_report(run_dir, checkpoints)
        log.info("report: %s", written[1])
    except Exception as e:  # the run's outcome stands whether or not its report could be drawn
        log.warning("report: could not be written (%s: %s); try `raytrainer report --run %s`",
                    type(e).__name__, e, run_dir.url)


def registered_with_ray(result: Any) -> dict:
    """The checkpoints this run registered with Ray Train (pointers to store steps), as Ray reports them."""
    from raytrainer.checkpoint.ray_pointers import read_pointer

    latest = read_pointer(result.checkpoint)
    steps = [p["step"] for p in (read_pointer(c) for c, _ in result.best_checkpoints or []) if p is not None]
    return {"ray_checkpoint_step": latest["step"] if latest else None, "ray_checkpoint_steps": sorted(steps)}


def summarize(cfg: Config) -> dict:
    """Where the run ended, from its own checkpoint store (the record of truth)."""
    from raytrainer.checkpoint import CheckpointStore

    store = CheckpointStore(cfg.checkpoint.storage, cfg.run.name, cfg.checkpoint.s3)
    step = store.latest_complete()
    state = store.read_json(step, "trainer_state.json") if step is not None else {}
    return {"run": cfg.run.name, "checkpoint": store.step_url(step) if step is not None else None,
            "step": step, "metrics": state.get("metrics", {})}


GUARDIAN_ABORT_EXIT_CODE = 3


def run_job(cfg: Config) -> int:
    """`run` as a job's main: exit status 0 when done, 2 for a configuration problem (a resubmitted run its
    guardian aborted among them), 3 when the guardian aborted the run (its incident report printed last), 130
    when Ctrl-C paused or stopped it (the same command resumes it)."""
    from raytrainer.fault.guardian import GuardianAbort
    from raytrainer.live.pause import EXIT_CODE as CTRL_C_EXIT_CODE

    try:
        result = run(cfg)
    except ConfigError as e:
        last_words(f"error: {e}")
        return 2
    except GuardianAbort as e:
        last_words(str(e))
        return GUARDIAN_ABORT_EXIT_CODE
    except KeyboardInterrupt:  # before fit() or after it (during the end-of-run report)
        last_words(f"interrupted (Ctrl-C): run {cfg.run.name} goes on from its newest checkpoint when the same "
                   "command is run again")
        return CTRL_C_EXIT_CODE
    if "paused" in result or "stopped" in result:
        how = (f"paused at step {result['step']} ({result['paused']}); checkpoint {result['checkpoint']} is "
               "committed" if "paused" in result else
               f"stopped at once ({result['stopped']}); its newest checkpoint is {result['checkpoint']}")
        print(f"{result['run']}: {how}. Run the same command again to go on from it.")
        return CTRL_C_EXIT_CODE
    m = result["metrics"]
    print(f"done: {result['run']} at step {result['step']}, loss {m.get('loss', float('nan')):.4f}; "
          f"checkpoint {result['checkpoint']}")
    return 0


def last_words(text: str) -> None:
    """Print `text` as the job's last output: Ray stops streaming worker logs to this process first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)

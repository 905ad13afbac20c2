"""ray.train.report(checkpoint_upload_fn=ray_upload_fn(...)) on Ray Train V2 with SeaweedFS as storage:
Ray's experiment directory is the store's <storage>/<run_name>, both ranks' uploads become one
committed checkpoint, and a second fit() of the same run resumes from it via ray.train.get_checkpoint()."""

from __future__ import annotations

import sys

import pytest

from raytrainer.fault.checkpoint_store import CheckpointStore
from raytrainer.storage import open_storage

pytestmark = pytest.mark.slow

RUN = "ray-run"


def _train_fn(config: dict) -> None:
    import os
    import tempfile

    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    from raytrainer.config import S3Config
    from raytrainer.fault.checkpoint_store import CheckpointStore, ray_upload_fn, step_from_path

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    store = CheckpointStore(config["url"], RUN, S3Config(**config["s3"]))
    resumed = ray.train.get_checkpoint()
    start = step_from_path(resumed.path) if resumed else 0
    if resumed:
        assert store.is_complete(start)
    for step in range(start + 1, start + 3):
        staging = tempfile.mkdtemp()
        with open(os.path.join(staging, f"shard-{rank}.bin"), "wb") as f:
            f.write(os.urandom(64 * 1024))
        ray.train.report(
            {"step": step, "resumed_from": start},
            checkpoint=Checkpoint.from_directory(staging),
            checkpoint_dir_name=CheckpointStore.ray_checkpoint_dir_name(step),
            # One step each way: ASYNC returns before the upload, Ray keeps the reports in order.
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC if step % 2 else CheckpointUploadMode.SYNC,
            checkpoint_upload_fn=ray_upload_fn(store, step, rank, world_size, {"step": step}),
        )


def test_report_with_store_upload_fn_and_resume(s3_server, s3_url, monkeypatch):
    import ray
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    cfg = s3_server.s3_config()
    storage = open_storage(s3_url, cfg)
    store = CheckpointStore(s3_url, RUN, cfg)

    def fit():
        trainer = DataParallelTrainer(
            _train_fn,
            train_loop_config={"url": s3_url, "s3": cfg.model_dump()},
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            # The wiring under test: Ray's experiment dir <storage.root>/<RUN> is the store's run dir.
            run_config=ray.train.RunConfig(name=RUN, storage_path=storage.root,
                                           storage_filesystem=storage.fs),
        )
        return trainer.fit()

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    # Test modules are not importable on Ray workers: ship _train_fn by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        first = fit()
        assert first.error is None
        assert first.checkpoint.path == store.step_path(2)
        assert store.steps() == [1, 2]
        assert sorted(store.records(2)[1].files) == ["shard-1.bin"]

        second = fit()  # same run name: Ray's snapshot hands back step 2
        assert second.metrics["resumed_from"] == 2
        assert second.checkpoint.path == store.step_path(4)
        assert store.steps() == [1, 2, 3, 4] and store.verify(4, full=True).ok
    finally:
        ray.shutdown()

"""The validation batches: the held-out documents (the manifest's validation split, or every shard of
`data.val_path`), packed in manifest order into `eval.batches` batches of rows at the run's longest
sequence length. They depend on the dataset and the config alone, so every evaluation, at any world size,
measures the same tokens; each rank takes its contiguous share of each batch's rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from raytrainer.config import Config
from raytrainer.data.feed import padding_micro_batch
from raytrainer.data.fs import open_storage
from raytrainer.data.manifest import MANIFEST_NAME, DataError, Manifest
from raytrainer.data.objectives import Objective
from raytrainer.data.packing import ARRAY_KEYS, Piece, fill_rows, micro_batch_sizes, rank_rows
from raytrainer.data.pipeline import ReadSpec, StepWork, doc_loader, materialise, process_cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationPlan:
    dataset: str
    shard_paths: tuple[str, ...]
    seq_len: int
    rows_per_batch: int
    batches: int  # what the split holds, at most eval.batches
    tokens: int  # real (not padding) tokens in those rows
    segments: np.ndarray
    spec: ReadSpec


def plan_validation(cfg: Config, manifest_dir: str | None = None, *, warn: bool = True) -> ValidationPlan:
    """Which tokens every evaluation of this run measures."""
    dataset = cfg.data.val_path or manifest_dir or cfg.data.path
    manifest = Manifest.load(dataset, cfg.data.s3)
    where = f"{dataset}/{MANIFEST_NAME}"
    shards = manifest.shards + manifest.validation if cfg.data.val_path else manifest.validation
    if not shards:
        raise DataError(f"{where} has no validation split, but eval.every_steps={cfg.eval.every_steps} asks "
                        "for evaluations: prepare the dataset again (`raytrainer prepare` holds out "
                        "--val-fraction 0.005 by default), or set data.val_path to a prepared dataset of "
                        "held-out text, or unset eval.every_steps")
    if cfg.data.val_path:
        train_manifest = Manifest.load(manifest_dir or cfg.data.path, cfg.data.s3)
        if train_manifest.tokenizer.get("hash") != manifest.tokenizer.get("hash"):
            raise DataError(f"data.val_path={cfg.data.val_path}: {where} was tokenised with "
                            f"{manifest.tokenizer.get('name')!r}, the training data with "
                            f"{train_manifest.tokenizer.get('name')!r}; prepare both with the same tokenizer")
    seq_len = max(cfg.phase_seq_lens())
    rows_per_batch = cfg.eval.rows_per_batch or cfg.train.global_batch_tokens // seq_len
    spec = _spec(cfg, dataset, manifest, tuple(s.path for s in shards))
    storage = open_storage(dataset, cfg.data.s3)
    lengths = [np.diff(process_cache().get(storage, s.path).offsets) for s in shards]

    def documents() -> Iterator[Piece]:
        doc = 0
        for shard, shard_lengths in enumerate(lengths):
            for row, n in enumerate(shard_lengths.tolist()):
                yield Piece(doc, shard, row, int(n) + spec.objective.extra_tokens(doc))
                doc += 1

    it = documents()
    want = cfg.eval.batches * rows_per_batch
    segments, _ = fill_rows(want, seq_len, lambda: next(it, None))
    tokens = int((segments[:, 5] - segments[:, 4]).sum()) if len(segments) else 0
    batches = min(cfg.eval.batches, max(1, math.ceil(tokens / (rows_per_batch * seq_len))))
    if batches < cfg.eval.batches and warn:
        log.warning("validation: %s holds %d tokens, enough for %d of eval.batches=%d batches of %d rows x %d; "
                    "every evaluation uses those %d (hold out more with a larger --val-fraction)", where,
                    tokens, batches, cfg.eval.batches, rows_per_batch, seq_len, batches)
    return ValidationPlan(dataset, spec.shard_paths, seq_len, rows_per_batch, batches, tokens, segments, spec)


def _spec(cfg: Config, dataset: str, manifest: Manifest, paths: tuple[str, ...]) -> ReadSpec:
    objective = Objective.from_config(cfg.data, cfg.train.seed, manifest.tokenizer,
                                      where=f"{dataset}/{MANIFEST_NAME}")
    return ReadSpec(dataset=dataset, s3=cfg.data.s3, shard_paths=paths, objective=objective,
                    vocab_size=manifest.vocab_size)


class ValidationBatches:
    """One rank's micro-batches of every validation batch (built once, kept in memory: they are small)."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, manifest_dir: str | None = None):
        self.plan = plan_validation(cfg, manifest_dir, warn=rank == 0)
        plan = self.plan
        spec = plan.spec
        load = doc_loader(spec)
        per_rank = math.ceil(plan.rows_per_batch / world_size)
        accumulation = math.ceil(per_rank / cfg.train.micro_batch_size)
        self.batches: list[list[dict[str, torch.Tensor]]] = []
        for b in range(plan.batches):
            start, end = rank_rows(plan.rows_per_batch, world_size, rank)
            first = b * plan.rows_per_batch
            sizes = micro_batch_sizes(end - start, cfg.train.micro_batch_size, accumulation)
            arrays = None
            if end > start:
                rows = plan.segments[:, 0]
                mine = plan.segments[(rows >= first + start) & (rows < first + end)]
                work = StepWork(-1 - b, plan.seq_len, first + start, end - start, mine)
                arrays = materialise(spec, work, load=load)
            micro = []
            offset = 0
            for size in sizes:
                if size == 0 or arrays is None:
                    micro.append(padding_micro_batch(plan.seq_len, spec.objective.pad_id))
                    continue
                micro.append({k: torch.from_numpy(np.asarray(arrays[k][offset:offset + size], dtype=np.int64))
                              for k in ARRAY_KEYS})
                offset += size
            self.batches.append(micro)

    @property
    def tokens(self) -> int:
        return self.plan.tokens


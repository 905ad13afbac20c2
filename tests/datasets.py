"""Small prepared datasets written directly as Parquet shards + manifest.json (no tokenizer run), for the
data-stream tests. Document contents are random byte-tokenizer ids, so every token is checkable."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrainer.config import Config, DataConfig, Phase, TrainConfig
from raytrainer.data.manifest import (
    DEFAULT_BUCKETS,
    Manifest,
    ShardRecord,
    bucket_of,
    length_histogram,
    shard_schema,
    source_totals,
)
from raytrainer.data.tokenizers import load_tokenizer

BYTE = load_tokenizer("byte")
EOS, PAD = BYTE.eos_id, BYTE.pad_id


@dataclass
class Doc:
    tokens: np.ndarray  # ends in EOS
    quality: float | None = None
    prompt_length: int | None = None


def random_docs(rng: np.random.Generator, n: int, mean_length: float = 300, max_length: int = 5000,
                quality: bool = True) -> list[Doc]:
    """Documents with log-normal lengths (a realistic long tail), random byte ids and an EOS."""
    lengths = np.clip(rng.lognormal(np.log(mean_length) - 0.5, 1.0, size=n).astype(int), 1, max_length)
    docs = []
    for n_tokens in lengths:
        body = rng.integers(0, 256, size=n_tokens - 1)
        q = float(rng.random()) if quality else None
        docs.append(Doc(np.append(body, EOS).astype(np.int64), q))
    return docs


def write_dataset(root: Path, sources: dict[str, list[Doc]], docs_per_shard: int = 50,
                  with_prompt_length: bool = False) -> Path:
    """Shards of one source and one length bucket each (documents in the given order), plus manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    buckets = list(DEFAULT_BUCKETS)
    schema = shard_schema("uint16")
    if with_prompt_length:
        schema = schema.append(pa.field("prompt_length", pa.int32(), nullable=True))
    records: list[ShardRecord] = []
    all_lengths = []
    for source in sorted(sources):
        docs = sources[source]
        lengths = np.array([len(d.tokens) for d in docs])
        all_lengths.extend(lengths.tolist())
        which = bucket_of(lengths, buckets)
        for b, bucket in enumerate(buckets):
            members = [d for d, w in zip(docs, which, strict=True) if w == b]
            for k in range(0, len(members), docs_per_shard):
                part = members[k: k + docs_per_shard]
                rel = f"{source}/{bucket.name}/shard-{k // docs_per_shard:06d}.parquet"
                columns = {
                    "tokens": [d.tokens.astype(np.uint16) for d in part],
                    "length": [len(d.tokens) for d in part],
                    "source": [source] * len(part),
                    "quality": [d.quality for d in part],
                }
                if with_prompt_length:
                    columns["prompt_length"] = [d.prompt_length for d in part]
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.table(columns, schema=schema), path)
                data = path.read_bytes()
                records.append(ShardRecord(rel, source, bucket.name, len(part),
                                           int(sum(len(d.tokens) for d in part)), len(data),
                                           hashlib.sha256(data).hexdigest()))
    manifest = Manifest(tokenizer=BYTE.identity(), token_dtype="uint16", length_buckets=buckets,
                        shards=records, sources=source_totals(records),
                        length_histogram=length_histogram(np.array(all_lengths)), chars_per_token=1.0)
    manifest.save(str(root))
    return root


def documents_by_id(root: Path) -> dict[int, Doc]:
    """Every document of a dataset by its id (documents before its shard in the manifest + its row)."""
    manifest = Manifest.load(str(root))
    out, offset = {}, 0
    for shard in manifest.shards:
        table = pq.read_table(root / shard.path)
        rows = table.to_pylist()
        for i, row in enumerate(rows):
            tokens = np.array(row["tokens"], dtype=np.int64)
            out[offset + i] = Doc(tokens, row["quality"], row.get("prompt_length"))
        offset += shard.num_docs
    return out


def config(seq_len: int = 64, global_batch_tokens: int = 64 * 8, micro_batch_size: int = 2, seed: int = 7,
           phases: list[Phase] | None = None, max_workers: int = 4, **data) -> Config:
    """A small Config for the data tests (the model section is only made big enough to be valid)."""
    train = TrainConfig(seq_len=seq_len, global_batch_tokens=global_batch_tokens,
                        micro_batch_size=micro_batch_size, seed=seed)
    data_cfg = DataConfig(phases=phases or [Phase()], **data)
    lens = [seq_len] + [p.seq_len for p in (phases or []) if p.seq_len]
    return Config.model_validate({
        "train": train.model_dump(), "data": data_cfg.model_dump(),
        "model": {"max_seq_len": max(lens), "vocab_size": 320, "bidirectional": data.get("objective") == "mlm",
                  "mtp_heads": 0},
        "parallel": {"max_workers": max_workers},
    })

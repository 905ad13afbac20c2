"""Small end-to-end runs for the loop, Ray and fault tests: a micro model on a small prepared dataset."""

from __future__ import annotations

from pathlib import Path

from raytrainer.config import Config, load_config

# A micro model and batch: seconds per run. Recovery tests that must run with a preset's own settings use
# only this part and keep the preset's checkpoint interval, retention, guardian thresholds and schedule.
MICRO_MODEL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=32",
    "model.max_seq_len=128", "train.seq_len=64", "train.global_batch_tokens=1024", "train.micro_batch_size=4",
]
MICRO = [
    *MICRO_MODEL,
    "schedule.warmup_steps=5", "optim.lr=3e-3", "train.log_every=5",
    "checkpoint.keep_last=2", "checkpoint.every_steps=10",  # the tiny preset's retention; a denser interval
    "guardian.warmup_exempt_steps=5", "guardian.min_window=8", "guardian.window=16",
]


def make_dataset(root: Path) -> Path:
    """About 300k byte tokens of the sample corpus, prepared in-process (no Ray) in a few seconds."""
    from raytrainer.data.sample_corpus import make_sample_dataset

    out = root / "dataset"
    if not (out / "manifest.json").exists():
        make_sample_dataset(str(out), max_bytes=300_000, shard_tokens=1 << 16, use_ray=False)
    return out


def make_patterned_dataset(root: Path, docs: int = 3000) -> Path:
    """Documents that run through the alphabet from a random letter: every byte is uniform on its own and
    fully determined by the one before. A micro model learns that in ~30 steps, after which shuffled labels
    (which keep every row's byte counts) are as wrong as they can be, and must be caught."""
    import json
    import string

    import numpy as np

    from raytrainer.data.prepare import prepare_dataset
    from raytrainer.data.sources import InputSpec

    out = root / "patterned"
    if not (out / "manifest.json").exists():
        rng = np.random.default_rng(0)
        letters = string.ascii_lowercase
        raw = root / "patterned.jsonl"
        with raw.open("w") as f:
            for _ in range(docs):
                start, n = int(rng.integers(26)), int(rng.integers(50, 400))
                f.write(json.dumps({"text": "".join(letters[(start + j) % 26] for j in range(n))}) + "\n")
        prepare_dataset([InputSpec(str(raw), "alphabet")], str(out), "byte", use_ray=False)
    return out


def micro_config(dataset: Path, storage: str, name: str = "micro", steps: int = 40, extra: list[str] = ()) -> Config:
    return load_config("tiny", [*MICRO, f"data.path={dataset}", f"checkpoint.storage={storage}",
                                f"run.name={name}", f"train.steps={steps}", *extra])

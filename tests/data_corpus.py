"""A tiny raw corpus in every input format, and readers for prepared shards (used by the data tests)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq

from raytrainer.data.manifest import Manifest
from raytrainer.data.sources import InputSpec

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bad jokes".split()


def text_of(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    while sum(map(len, out)) < n_chars:
        out.append(rng.choice(WORDS))
    return " ".join(out)[:n_chars]


def write_corpus(root: Path) -> tuple[list[InputSpec], dict[str, list[tuple[str, float | None]]]]:
    """Text files (source notes), JSON Lines with a quality field (web) and Parquet with a text column
    named `body` and several row groups (books). Returns the input specs and, per source, the non-empty
    documents in the order prepare reads them: files sorted by URL, then by position in the file."""
    notes = root / "notes"
    (notes / "sub").mkdir(parents=True)
    files = {"a.txt": text_of(100, 1), "b.md": text_of(700, 2), "sub/c.py": text_of(3000, 3), "empty.txt": ""}
    for name, text in files.items():
        (notes / name).write_text(text)
    (notes / "ignored.bin").write_bytes(b"\x00\x01")  # not a text suffix: not an input
    expected: dict[str, list[tuple[str, float | None]]] = {
        "notes": [(files[n], None) for n in sorted(files, key=lambda n: str(notes / n)) if files[n]],
    }

    web = [(text_of(50 + 97 * i, 10 + i), round(i / 20, 2)) for i in range(20)] + [("", 0.5)]
    with open(root / "web.jsonl", "w") as f:
        for text, quality in web:
            f.write(json.dumps({"text": text, "q": quality, "url": "http://x"}) + "\n")
    expected["web"] = [(t, q) for t, q in web if t]

    books = [(text_of(300 + 211 * i, 50 + i), float(i)) for i in range(12)]
    table = pa.table({"body": [t for t, _ in books], "score": [q for _, q in books], "id": list(range(12))})
    pq.write_table(table, root / "books.parquet", row_group_size=4)
    expected["books"] = books

    inputs = [
        InputSpec(str(notes), "notes"),
        InputSpec(str(root / "*.jsonl"), "web", quality_field="q"),
        InputSpec(str(root / "books.parquet"), "books", text_field="body", quality_field="score"),
    ]
    return inputs, expected


def read_docs(dataset: Path) -> dict[str, list[dict]]:
    """Per source, every document row of every shard, shards in manifest order."""
    manifest = Manifest.load(str(dataset))
    out: dict[str, list[dict]] = {}
    for shard in manifest.shards:
        rows = pq.read_table(dataset / shard.path).to_pylist()
        out.setdefault(shard.source, []).extend({**r, "bucket": shard.bucket} for r in rows)
    return out


def mtimes(dataset: Path) -> dict[str, int]:
    return {str(p.relative_to(dataset)): p.stat().st_mtime_ns for p in dataset.rglob("*.parquet")}


def load_script(folder: str, name: str) -> ModuleType:
    """A script under jobs/ or bench/ as a module (neither is a package)."""
    path = Path(__file__).resolve().parent.parent / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_job(name: str) -> ModuleType:
    return load_script("jobs", name)

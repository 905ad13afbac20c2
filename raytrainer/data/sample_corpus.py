"""A small training corpus made from what every Python installation has: nothing is downloaded.

Two sources:
  code  the standard library's .py files, one document per file
  docs  prose: the Python reference documentation (pydoc_data.topics), the .txt/.rst/.md files shipped in
        the standard library, and one reference page per module built from its docstrings

Files are taken in a fixed pseudo-random order (by hash of their path) until the byte budget of each
source is spent, so a capped corpus still mixes many modules. Every document gets a quality score: the
fraction of its characters that are letters. The corpus is written as JSON Lines parts under raw_dir,
then tokenised with prepare_dataset.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raytrainer.config import S3Config
from raytrainer.data.fs import is_local, join
from raytrainer.data.prepare import PrepareResult, prepare_dataset
from raytrainer.data.sources import InputSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 6_000_000  # about as many tokens with the byte tokenizer
DOCS_FRACTION = 0.3
PART_BYTES = 1 << 20  # bytes per JSON Lines part, so tokenising is spread over several workers
PROSE_SUFFIXES = (".txt", ".rst", ".md")
SKIP_DIRS = {"site-packages", "__pycache__", "dist-packages"}
TEST_DIRS = {"test", "tests", "idle_test"}  # few docstrings there: not worth parsing for reference pages
_NOT_LETTERS = re.compile(r"[\W\d_]+")


@dataclass
class CorpusStats:
    docs: dict[str, int]
    bytes: dict[str, int]
    files: list[str]  # the JSON Lines parts written (or left as they were)


def build_sample_corpus(raw_dir: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                        docs_fraction: float = DOCS_FRACTION) -> CorpusStats:
    """Write raw_dir/code-NNNNN.jsonl and raw_dir/docs-NNNNN.jsonl ({"text", "quality", "origin"} per line),
    about max_bytes of text in all. A part whose content has not changed is not rewritten."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive")
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    py_files, prose_files = _stdlib_files(stdlib)
    docs_budget = int(max_bytes * docs_fraction)
    budgets = {"code": max_bytes - docs_budget, "docs": docs_budget}
    generators = {"code": _code_documents(stdlib, py_files), "docs": _prose_documents(stdlib, py_files,
                                                                                       prose_files)}
    stats = CorpusStats(docs={}, bytes={}, files=[])
    for source, documents in generators.items():
        lines, used, misses = [], 0, 0
        for origin, text in documents:
            size = len(text.encode("utf-8"))
            if used + size > budgets[source]:
                misses += 1
                if used and misses > 50:
                    break
                if used:
                    continue  # a smaller document further on may still fit
                text = text[: budgets[source]]  # the budget is below one document: take a slice
                size = len(text.encode("utf-8"))
            lines.append(json.dumps({"text": text, "quality": quality_score(text), "origin": origin}))
            used += size
            if used >= budgets[source] * 0.999:
                break
        stats.docs[source], stats.bytes[source] = len(lines), used
        stats.files += _write_parts(raw, source, lines)
    log.info("sample corpus in %s: %s documents, %s bytes of text", raw, stats.docs, stats.bytes)
    return stats


def make_sample_dataset(out: str = "data/sample", tokenizer: str = "byte", *,
                        max_bytes: int = DEFAULT_MAX_BYTES, shard_tokens: int = 1 << 20,
                        raw_dir: str | None = None, use_ray: bool = True, s3: S3Config | None = None,
                        force: bool = False) -> PrepareResult:
    """Build the corpus under raw_dir (default: <out>/raw for a local out, else a local data/sample-raw)
    and prepare it into `out`."""
    if raw_dir is None:
        raw_dir = join(out, "raw") if is_local(out) else "data/sample-raw"
    build_sample_corpus(raw_dir, max_bytes)
    inputs = [
        InputSpec(str(Path(raw_dir) / "code-*.jsonl"), "code", quality_field="quality"),
        InputSpec(str(Path(raw_dir) / "docs-*.jsonl"), "docs", quality_field="quality"),
    ]
    return prepare_dataset(inputs, out, tokenizer, shard_tokens=shard_tokens, s3=s3, use_ray=use_ray,
                           force=force)


def sample_path_for(tokenizer: str, default: str) -> str:
    """Where the sample corpus in `tokenizer` lives: `default` (data/sample) when that holds it in this
    tokenizer, or holds nothing yet and this is the default job's byte tokenizer; else `<default>-<name>`
    (data/sample-gpt2), so a preset on another tokenizer neither trips on nor replaces the default job's copy."""
    from raytrainer.data.manifest import Manifest
    from raytrainer.data.tokenizers import load_tokenizer

    identity = load_tokenizer(tokenizer).identity()
    if os.path.exists(os.path.join(default, "manifest.json")):
        if Manifest.load(default).tokenizer.get("hash") == identity["hash"]:
            return default
    elif tokenizer == "byte":
        return default
    name = tokenizer if re.fullmatch(r"[A-Za-z0-9_.-]+", tokenizer) else f"tok-{identity['hash'][:12]}"
    return f"{default}-{name}"


def quality_score(text: str) -> float:
    """Fraction of characters that are letters: high for prose, lower for code, low for tables of numbers."""
    if not text:
        return 0.0
    return round(len(_NOT_LETTERS.sub("", text)) / len(text), 4)


# --------------------------------------------------------------------------- gathering documents


def _stdlib_files(stdlib: Path) -> tuple[list[Path], list[Path]]:
    py, prose = [], []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith(".py"):
                py.append(Path(root, name))
            elif name.endswith(PROSE_SUFFIXES):
                prose.append(Path(root, name))
    return _shuffled(stdlib, py), _shuffled(stdlib, prose)


def _shuffled(root: Path, paths: list[Path]) -> list[Path]:
    # A fixed order that is not alphabetical, so a small budget still spans many packages.
    def key(p: Path) -> str:
        return hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest()

    return sorted(paths, key=key)


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _code_documents(stdlib: Path, files: list[Path]) -> Iterator[tuple[str, str]]:
    for path in files:
        text = _read(path)
        if text.strip():
            yield path.relative_to(stdlib).as_posix(), text


def _prose_documents(stdlib: Path, py_files: list[Path], prose_files: list[Path]
                     ) -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data.topics:{name}", f"{name}\n{'=' * len(name)}\n\n{topics[name].strip()}\n"
    for path in prose_files:
        text = _read(path)
        if text.strip():
            yield path.relative_to(stdlib).as_posix(), text
    for path in py_files:
        if TEST_DIRS & set(path.relative_to(stdlib).parts):
            continue
        page = _docstring_page(stdlib, path)
        if page:
            yield path.relative_to(stdlib).as_posix() + ":docstrings", page


def _docstring_page(stdlib: Path, path: Path) -> str | None:
    """A module's docstrings as one reference page, or None when it has too little prose."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return None  # the standard library ships some files that are broken on purpose (test data)
    module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
    sections = []
    doc = ast.get_docstring(tree)
    if doc:
        sections.append(f"Module {module}\n\n{doc}")
    # Top-level definitions and methods; nested helpers rarely document anything public.
    nodes = [*tree.body, *(n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body)]
    for node in nodes:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                head = f"class {node.name}" if isinstance(node, ast.ClassDef) else f"{node.name}(...)"
                sections.append(f"{head}\n    " + doc.replace("\n", "\n    "))
    if sum(map(len, sections)) < 200:
        return None
    if not sections[0].startswith("Module"):
        sections.insert(0, f"Module {module}")
    return "\n\n".join(sections) + "\n"


def _write_parts(raw: Path, source: str, lines: list[str]) -> list[str]:
    parts: list[list[str]] = [[]]
    size = 0
    for line in lines:
        if size >= PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(line)
        size += len(line) + 1
    written = []
    for i, part in enumerate(p for p in parts if p):
        path = raw / f"{source}-{i:05d}.jsonl"
        data = ("\n".join(part) + "\n").encode("utf-8")
        if not path.exists() or path.read_bytes() != data:  # keep mtimes, so prepare sees nothing changed
            path.write_bytes(data)
        written.append(str(path))
    for stale in raw.glob(f"{source}-*.jsonl"):
        if str(stale) not in written:
            stale.unlink()
    return written

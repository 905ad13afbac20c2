"""Input readers: text files, JSON Lines and Parquet, local or any fsspec URL, each tagged with a source.

    InputSpec("data/raw/web/*.jsonl", source="web", text_field="text", quality_field="score")
    parse_input("code=/usr/lib/python3.11/**/*.py")          # the CLI form: SOURCE=PATH[::options]

A path is a file, a directory (walked recursively) or a glob (`**` matches any depth). File kinds go by
suffix: .txt .md .py .rst (one document per file), .jsonl / .jsonl.gz (one JSON object per line, text
in `text_field`), .parquet (text in column `text_field`). `quality_field` optionally names a numeric
per-document score carried into the shards. `prompt_field` (JSON Lines and Parquet) makes each record an
instruction example: the prompt is tokenised before the text (the response) and its token count is kept
as `prompt_length`, so the SFT objective can leave the prompt unlearned.

Large Parquet files are split into pieces of whole row groups so that one file can be tokenised by
several workers; everything else is one piece per file. Pieces keep the sorted file order, which makes
the document order (and so the shards) a function of the inputs alone.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytrainer.config import S3Config
from raytrainer.data.fs import list_files, open_arrow_fs, open_fsspec
from raytrainer.data.manifest import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PIECE_BYTES = 32 * 1024 * 1024  # input bytes per unit of work, at most
MIN_PIECE_BYTES = 1024 * 1024  # ... and at least, unless the files are smaller
TARGET_UNITS = 32  # small inputs are cut finer, so that every worker gets some
PIECE_FILES = 256  # small text files per unit of work
READ_BATCH_DOCS = 1024


@dataclass(frozen=True)
class InputSpec:
    path: str  # file, directory or glob; local or URL
    source: str
    text_field: str = "text"
    quality_field: str | None = None
    prompt_field: str | None = None


@dataclass(frozen=True)
class InputFile:
    url: str
    kind: str  # "text" | "jsonl" | "parquet"
    source: str
    text_field: str
    quality_field: str | None
    size: int
    version: str
    prompt_field: str | None = None


@dataclass(frozen=True)
class Piece:
    """A file, or a range of a Parquet file's row groups [start, stop)."""

    file: InputFile
    row_groups: tuple[int, int] | None = None


@dataclass
class WorkUnit:
    """Pieces tokenised together by one worker call, all of one source."""

    pieces: list[Piece] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps([{"file": asdict(p.file), "row_groups": p.row_groups} for p in self.pieces])

    @classmethod
    def from_json(cls, text: str) -> WorkUnit:
        pieces = [Piece(InputFile(**p["file"]), tuple(p["row_groups"]) if p["row_groups"] else None)
                  for p in json.loads(text)]
        return cls(pieces)


# --------------------------------------------------------------------------- specs


def parse_input(arg: str, text_field: str = "text", quality_field: str | None = None,
                prompt_field: str | None = None) -> InputSpec:
    """`SOURCE=PATH` or `SOURCE=PATH::text=FIELD,quality=FIELD,prompt=FIELD` (the options override the
    defaults)."""
    source, sep, rest = arg.partition("=")
    if not sep or not source or not rest:
        raise DataError(f"--input {arg!r}: expected SOURCE=PATH, e.g. web=data/raw/web/*.jsonl")
    path, _, options = rest.partition("::")
    for option in filter(None, (o.strip() for o in options.split(","))):
        key, _, value = option.partition("=")
        if key in ("text", "text_field") and value:
            text_field = value
        elif key in ("quality", "quality_field"):
            quality_field = value or None
        elif key in ("prompt", "prompt_field"):
            prompt_field = value or None
        else:
            raise DataError(f"--input {arg!r}: unknown option {option!r}; use text=FIELD, quality=FIELD, "
                            "prompt=FIELD")
    spec = InputSpec(path=path, source=source.strip(), text_field=text_field, quality_field=quality_field,
                     prompt_field=prompt_field)
    check_source_name(spec.source, arg)
    return spec


def check_source_name(name: str, where: str) -> None:
    # Source names become directory names of the shards.
    if not name or name in (".", "..") or not all(c.isalnum() or c in "_.-" for c in name):
        raise DataError(f"{where}: source name {name!r} may use only letters, digits, _ . - (it names a "
                        "directory of shards)")


def file_kind(url: str) -> str | None:
    name = posixpath.basename(url)
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def expand_inputs(specs: Sequence[InputSpec], s3: S3Config | None = None) -> list[InputFile]:
    """Every input file, sorted by (source, url). Errors name the input that matched nothing, a file of
    an unknown kind, or a file claimed by two sources."""
    if not specs:
        raise DataError("no inputs given; pass at least one --input SOURCE=PATH")
    files: list[InputFile] = []
    owner: dict[str, str] = {}
    for spec in specs:
        check_source_name(spec.source, f"input {spec.source}={spec.path}")
        entries = list_files(spec.path, s3, suffixes=ALL_SUFFIXES)
        if not entries:
            raise DataError(f"input {spec.source}={spec.path}: no files found (looked for "
                            f"{', '.join(ALL_SUFFIXES)}); check the path or glob")
        for entry in entries:
            kind = file_kind(entry.url)
            if kind is None:
                raise DataError(f"input {spec.source}={spec.path}: {entry.url} is not a supported kind of "
                                f"file; use one of {', '.join(ALL_SUFFIXES)}")
            if entry.url in owner and owner[entry.url] != spec.source:
                raise DataError(f"{entry.url} is matched by inputs of two sources ({owner[entry.url]} and "
                                f"{spec.source}); narrow one of the paths")
            if entry.url in owner:
                continue
            if spec.prompt_field and kind == "text":
                raise DataError(f"input {spec.source}={spec.path}: {entry.url} is a plain text file, which has "
                                f"no field {spec.prompt_field!r}; prompt=FIELD applies to .jsonl and .parquet")
            owner[entry.url] = spec.source
            files.append(InputFile(entry.url, kind, spec.source, spec.text_field, spec.quality_field,
                                   entry.size, entry.version, spec.prompt_field))
    return sorted(files, key=lambda f: (f.source, f.url))


# --------------------------------------------------------------------------- units of work


def plan_units(files: Sequence[InputFile], s3: S3Config | None = None, piece_bytes: int | None = None
               ) -> list[WorkUnit]:
    """Group files (in order) into units of about `piece_bytes` input bytes, one source per unit. By
    default the size aims at TARGET_UNITS units, within [MIN_PIECE_BYTES, PIECE_BYTES]."""
    if piece_bytes is None:
        total = sum(f.size for f in files)
        piece_bytes = min(PIECE_BYTES, max(MIN_PIECE_BYTES, total // TARGET_UNITS))
    pieces: list[tuple[Piece, int]] = []
    for f in files:
        if f.kind == "parquet":
            pieces.extend(_parquet_pieces(f, s3, piece_bytes))
        else:
            pieces.append((Piece(f), f.size))
    units: list[WorkUnit] = []
    size = 0
    for piece, nbytes in pieces:
        unit = units[-1] if units else None
        if (unit is None or unit.pieces[0].file.source != piece.file.source or size + nbytes > piece_bytes
                or len(unit.pieces) >= PIECE_FILES):
            units.append(WorkUnit())
            size = 0
        units[-1].pieces.append(piece)
        size += nbytes
    return units


def _parquet_pieces(f: InputFile, s3: S3Config | None, piece_bytes: int) -> list[tuple[Piece, int]]:
    meta = open_parquet(f, s3).metadata
    out: list[tuple[Piece, int]] = []
    start, size = 0, 0
    for i in range(meta.num_row_groups):
        rg_bytes = meta.row_group(i).total_byte_size
        if i > start and size + rg_bytes > piece_bytes:
            out.append((Piece(f, (start, i)), size))
            start, size = i, 0
        size += rg_bytes
    if meta.num_row_groups > start:
        out.append((Piece(f, (start, meta.num_row_groups)), size))
    return out


# --------------------------------------------------------------------------- reading documents


@dataclass
class DocBatch:
    """Documents in file order. `prompts` is None unless the input has a prompt field."""

    texts: list[str] = field(default_factory=list)
    qualities: list[float | None] = field(default_factory=list)
    prompts: list[str] | None = None

    def extend(self, other: DocBatch) -> None:
        if other.prompts is not None:
            self.prompts = (self.prompts or [""] * len(self.texts)) + other.prompts
        elif self.prompts is not None:
            self.prompts += [""] * len(other.texts)
        self.texts += other.texts
        self.qualities += other.qualities

    def chars(self) -> int:
        return sum(map(len, self.texts)) + (sum(map(len, self.prompts)) if self.prompts else 0)


def iter_documents(piece: Piece, s3: S3Config | None = None, batch_docs: int = READ_BATCH_DOCS
                   ) -> Iterator[DocBatch]:
    """Batches of documents in file order. A null text (or prompt) reads as empty."""
    f = piece.file
    try:
        if f.kind == "text":
            yield DocBatch([_read_text(f, s3)], [None])
        elif f.kind == "jsonl":
            yield from _iter_jsonl(f, s3, batch_docs)
        elif f.kind == "parquet":
            yield from _iter_parquet(piece, s3, batch_docs)
        else:
            raise DataError(f"{f.url}: unknown input kind {f.kind!r}")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{f.url}: input file disappeared while preparing; re-run when inputs are stable") \
            from None
    except (OSError, pa.ArrowException, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{f.url}: cannot be read as {f.kind} ({type(e).__name__}: {e}); fix or remove "
                        "the file") from None


def _read_text(f: InputFile, s3: S3Config | None) -> str:
    fs, path = open_fsspec(f.url, s3)
    with fs.open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def _iter_jsonl(f: InputFile, s3: S3Config | None, batch_docs: int) -> Iterator[DocBatch]:
    fs, path = open_fsspec(f.url, s3)
    batch = _empty_batch(f)
    with fs.open(path, "rb", compression="infer") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{f.url} line {n}: not valid JSON ({e}); each line must be one JSON "
                                "object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{f.url} line {n}: expected a JSON object, got {type(obj).__name__}")
            batch.texts.append(_string_field(obj, f.text_field, "text", f, n))
            batch.qualities.append(_quality(obj.get(f.quality_field), f, n) if f.quality_field else None)
            if batch.prompts is not None:
                batch.prompts.append(_string_field(obj, f.prompt_field, "prompt", f, n))
            if len(batch.texts) >= batch_docs:
                yield batch
                batch = _empty_batch(f)
    if batch.texts:
        yield batch


def _empty_batch(f: InputFile) -> DocBatch:
    return DocBatch(prompts=[] if f.prompt_field else None)


def _string_field(obj: dict, name: str, role: str, f: InputFile, line: int) -> str:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{f.url} line {line}: field {name!r} is {type(value).__name__}, not a string")
    if value is None and name not in obj:
        raise DataError(f"{f.url} line {line}: no field {name!r} (fields: {sorted(obj)[:10]}); set the "
                        f"{role} field with --input SOURCE=PATH::{role}=FIELD")
    return value or ""


def _quality(value: object, f: InputFile, line: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{f.url} line {line}: quality field {f.quality_field!r} = {value!r} is not a number")
    return float(value)


def open_parquet(f: InputFile, s3: S3Config | None) -> pq.ParquetFile:
    fs, path = open_arrow_fs(f.url, s3)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except FileNotFoundError:
        raise DataError(f"{f.url}: input file not found") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{f.url}: not a readable Parquet file ({e}); fix or remove it") from None
    schema = pf.schema_arrow
    for column, want in ((f.text_field, "string"), (f.quality_field, "number"), (f.prompt_field, "string")):
        if column is None:
            continue
        if column not in schema.names:
            raise DataError(f"{f.url}: no column {column!r} (columns: {schema.names}); set the field with "
                            "--input SOURCE=PATH::text=COLUMN,quality=COLUMN,prompt=COLUMN")
        kind = schema.field(column).type
        ok = (pa.types.is_string(kind) or pa.types.is_large_string(kind)) if want == "string" else (
            pa.types.is_integer(kind) or pa.types.is_floating(kind))
        if not ok:
            raise DataError(f"{f.url}: column {column!r} has type {kind}, expected a {want}")
    return pf


def _iter_parquet(piece: Piece, s3: S3Config | None, batch_docs: int) -> Iterator[DocBatch]:
    f = piece.file
    pf = open_parquet(f, s3)
    columns = list(dict.fromkeys(c for c in (f.text_field, f.quality_field, f.prompt_field) if c))
    start, stop = piece.row_groups or (0, pf.metadata.num_row_groups)
    for batch in pf.iter_batches(batch_size=batch_docs, row_groups=range(start, stop), columns=columns):
        texts = batch.column(f.text_field).fill_null("").to_pylist()
        if f.quality_field:
            qualities = pc.cast(batch.column(f.quality_field), pa.float64()).to_pylist()
        else:
            qualities = [None] * len(texts)
        prompts = batch.column(f.prompt_field).fill_null("").to_pylist() if f.prompt_field else None
        yield DocBatch(texts, qualities, prompts)

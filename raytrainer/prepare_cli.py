"""Tokenise raw text into a training dataset (Parquet shards + manifest.json), or validate one.

    raytrainer prepare ...   (the same as python jobs/prepare_data.py ...)
    python jobs/prepare_data.py --input web=data/raw/web/*.jsonl --input code='/usr/lib/python3.11/**/*.py' \
        --out data/web --tokenizer gpt2
    python jobs/prepare_data.py --input web=s3://bucket/raw/web/::text=content,quality=score \
        --out s3://bucket/data/web --s3-endpoint-url http://127.0.0.1:8333
    python jobs/prepare_data.py --validate data/web --tokenizer gpt2 [--on-bad-shard skip] [--sha256]

An input is SOURCE=PATH: a file, directory or glob (quote globs), local or s3://. Files: .txt .md .py
.rst (one document each), .jsonl (field `text`), .parquet (column `text`); `::text=F,quality=F` picks
other fields, and `::prompt=F` marks instruction data (prompt tokens are kept apart for the sft
objective):

    python jobs/prepare_data.py --input chat=data/raw/sft.jsonl::prompt=instruction,text=response --out data/sft
 Re-running with the same --out keeps the shards that are already finished. S3 credentials
come from --config's data.s3 or the AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import argparse
import logging
import sys

from raytrainer.config import ConfigError, DataConfig, S3Config, load_config
from raytrainer.data.manifest import DEFAULT_BUCKETS, DataError, parse_buckets
from raytrainer.data.prepare import parse_token_count
from raytrainer.storage import StorageError


def parse_count(text: str) -> int:
    try:
        return parse_token_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", default=[], metavar="SOURCE=PATH",
                   help="input files of one source (repeatable)")
    p.add_argument("--out", help="dataset directory to write (local or s3://); default: --config's data.path")
    p.add_argument("--validate", metavar="DIR", nargs="?", const="", default=None,
                   help="validate a prepared dataset instead (default DIR: data.path of --config)")
    p.add_argument("--config", help="YAML config or preset: its data.tokenizer, data.path, data.s3")
    p.add_argument("--tokenizer", help="byte (default) | gpt2 | path to tokenizer.json | path to .tiktoken")
    p.add_argument("--shard-tokens", type=parse_count, default=None, help="tokens per shard (default 8M)")
    p.add_argument("--buckets", default=None,
                   help="length buckets, e.g. short:512,medium:2048,long (the default)")
    p.add_argument("--text-field", default="text", help="JSON field / Parquet column with the text")
    p.add_argument("--quality-field", default=None, help="optional numeric quality field / column")
    p.add_argument("--prompt-field", default=None,
                   help="instruction data: field / column with the prompt, tokenised before the text")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="documents held out for validation, chosen by a hash of their tokens (default 0.005, "
                        "at least 8192 tokens; 0 for none)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer workers (default: one per core)")
    p.add_argument("--local", action="store_true", help="tokenise in this process, without Ray")
    p.add_argument("--force", action="store_true", help="recompute even if the inputs look unchanged")
    p.add_argument("--on-bad-shard", choices=["fail", "skip"], default=None, help="--validate: what to do")
    p.add_argument("--sha256", action="store_true", help="--validate: also check every shard's sha256")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    p.add_argument("--s3-region", help="S3 region")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data = load_config(args.config).data if args.config else DataConfig()
        s3 = data.s3.model_copy(update={k: v for k, v in {"endpoint_url": args.s3_endpoint_url,
                                                           "region": args.s3_region}.items() if v})
        tokenizer = args.tokenizer or data.tokenizer
        if args.validate is not None:
            return _validate(args.validate or data.path, tokenizer, args.on_bad_shard or data.on_bad_shard,
                             args.sha256, s3)
        return _prepare(args, args.out or (data.path if args.config else None), tokenizer, s3)
    except (DataError, ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace, out: str | None, tokenizer: str, s3: S3Config) -> int:
    from raytrainer.data.prepare import DEFAULT_SHARD_TOKENS, prepare_dataset
    from raytrainer.data.sources import parse_input

    if not args.input or not out:
        print("error: give --input SOURCE=PATH and --out DIR, or --validate DIR", file=sys.stderr)
        return 2
    inputs = [parse_input(i, args.text_field, args.quality_field, args.prompt_field) for i in args.input]
    result = prepare_dataset(
        inputs, out, tokenizer,
        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
        buckets=parse_buckets(args.buckets) if args.buckets else DEFAULT_BUCKETS,
        s3=s3, use_ray=not args.local, num_workers=args.workers, force=args.force,
        val_fraction=args.val_fraction,
    )
    m = result.manifest
    state = "up to date" if result.up_to_date else f"{len(result.written)} written, {len(result.kept)} kept"
    per_source = ", ".join(f"{k}: {v['tokens']}" for k, v in m.sources.items())
    print(f"{result.out}: {len(m.shards)} shards ({state}), {m.num_docs} documents, {m.num_tokens} tokens "
          f"({per_source}), {m.token_dtype}, "
          f"{m.chars_per_token:.2f} chars/token, {result.seconds:.1f}s; validation split: "
          f"{sum(v.num_docs for v in m.validation)} documents, {m.validation_tokens} tokens")
    return 0


def _validate(path: str, tokenizer: str, on_bad_shard: str, sha256: bool, s3: S3Config) -> int:
    from raytrainer.data.tokenizers import load_tokenizer
    from raytrainer.data.validate import validate_dataset

    report = validate_dataset(path, load_tokenizer(tokenizer).identity(), on_bad_shard,  # type: ignore[arg-type]
                              check_sha256=sha256, s3=s3)
    m = report.manifest
    print(f"{path}: {report.checked - len(report.skipped)} of {report.checked} shards good"
          f"{f' ({len(report.skipped)} skipped)' if report.skipped else ''}, {m.num_docs} documents, "
          f"{m.num_tokens} tokens, tokenizer {m.tokenizer['name']}")
    return 0

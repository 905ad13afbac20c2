"""Build the sample dataset from the Python standard library (code) and its documentation (docs).

    python jobs/make_sample_data.py --out data/sample                  # ~6 M byte tokens
    python jobs/make_sample_data.py --out data/sample-gpt2 --tokenizer gpt2
    python jobs/make_sample_data.py --out /tmp/tiny --max-bytes 200000 --local

Nothing is downloaded. The raw corpus (JSON Lines) is kept under <out>/raw.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from raytrainer.data.manifest import DataError  # noqa: E402
from raytrainer.data.prepare import parse_token_count  # noqa: E402
from raytrainer.data.sample_corpus import DEFAULT_MAX_BYTES  # noqa: E402


def _count(text: str) -> int:
    try:
        return parse_token_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/sample", help="dataset directory (default data/sample)")
    p.add_argument("--tokenizer", default="byte", help="byte (default) | gpt2 | path to tokenizer.json")
    p.add_argument("--max-bytes", type=_count, default=DEFAULT_MAX_BYTES,
                   help=f"bytes of text in the corpus, about the byte-tokenizer token count "
                        f"(default {DEFAULT_MAX_BYTES})")
    p.add_argument("--shard-tokens", type=_count, default=1 << 20, help="tokens per shard (default 1M)")
    p.add_argument("--raw-dir", default=None, help="where to write the raw JSON Lines (default <out>/raw)")
    p.add_argument("--local", action="store_true", help="tokenise in this process, without Ray")
    p.add_argument("--force", action="store_true", help="recompute even if nothing changed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raytrainer.data.sample_corpus import make_sample_dataset

    try:
        result = make_sample_dataset(args.out, args.tokenizer, max_bytes=args.max_bytes,
                                     shard_tokens=args.shard_tokens, raw_dir=args.raw_dir,
                                     use_ray=not args.local, force=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = result.manifest
    per_source = ", ".join(f"{k}: {v['docs']} docs / {v['tokens']} tokens" for k, v in m.sources.items())
    print(f"{result.out}: {len(m.shards)} shards, {m.num_docs} documents, {m.num_tokens} tokens "
          f"({per_source}), {m.chars_per_token:.2f} chars/token, {result.seconds:.1f}s; held out for validation: "
          f"{sum(v.num_docs for v in m.validation)} documents, {m.validation_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

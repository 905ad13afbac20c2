"""Pretrain a model: `python jobs/pretrain.py --config configs/llama-1b.yaml [--set key=value ...]`.

With no arguments it runs the default job: the tiny model on the sample corpus, on a local Ray.
Submit to a cluster with `ray job submit --working-dir . -- python jobs/pretrain.py --config ...`.

Exit status: 0 done; 2 a configuration problem, in one line (a key, a dataset or a store it names that cannot
be used, a resubmitted run its guardian aborted until run.resume_after_abort is set); 3 the guardian aborted
the run, and its incident report is the last thing printed; 130 Ctrl-C paused the run at a checkpoint (or, twice,
stopped it at once), and the same command goes on from it.

With the default data.path the run trains on the sample corpus, built on first use in data.tokenizer's tokens
(data/sample for the default job's bytes, data/sample-gpt2 for a GPT-2 preset).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from raytrainer.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="YAML file or preset name (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own logs and every rank's INFO lines too (same as --set run.verbose=true)")
    args = parser.parse_args(argv)
    overrides = args.overrides + (["run.verbose=true"] if args.verbose else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from raytrainer.launch import run_job

    return run_job(cfg)


if __name__ == "__main__":
    sys.exit(main())

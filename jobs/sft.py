"""Fine-tune a model on instruction data:

    python jobs/sft.py --data data/raw/chat.jsonl --from runs/tiny               # all weights
    python jobs/sft.py --data data/raw/chat.jsonl --from runs/tiny --lora        # low-rank adapters only
    python jobs/sft.py --data chat.jsonl --from hf:/models/llama --config llama-1b --set optim.lr=2e-5

`--from` is a run directory (<checkpoint.storage>/<run.name>, optionally @step) whose checkpoint also gives
the model and tokenizer, or hf:<dir> with a --config that describes it. The examples (instruction/response
fields, or chat `messages`; see raytrainer/sft.py) are prepared into --out, and only response tokens are
learned. Everything else is the pretraining job's: strategies, checkpoints, the guardian, the report.
`raytrainer export --run <checkpoint.storage>/<run.name>` then writes the fine-tuned model (LoRA merged).
Exit status as jobs/pretrain.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from raytrainer.config import ConfigError, LoraConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="instruction examples, JSON Lines")
    parser.add_argument("--from", dest="start_from", required=True,
                        help="run directory (optionally @step) or hf:<dir> to start from")
    parser.add_argument("--config", default=None, help="preset or YAML for everything but the model (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="prepared dataset directory (default: data/sft-<data file>)")
    parser.add_argument("--prompt-field", default="instruction")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--lora", action="store_true", help="train low-rank adapters on the frozen model")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--local-prepare", action="store_true", help="tokenise in this process, without Ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raytrainer.data.prepare import prepare_dataset
    from raytrainer.data.sources import parse_input
    from raytrainer.sft import sft_config, write_examples

    start_from = args.start_from if args.start_from.startswith(("hf:", "run:")) else f"run:{args.start_from}"
    out = args.out or f"data/sft-{Path(args.data).stem}"
    try:
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=args.lora_targets.split(",")) if args.lora else None
        examples = Path(out) / "examples.jsonl"
        count = write_examples(args.data, examples, args.prompt_field, args.response_field)
        cfg = sft_config(start_from, out, args.config, args.overrides, lora)
        prepare_dataset([parse_input(f"sft={examples}::prompt=prompt,text=response")], out, cfg.data.tokenizer,
                        use_ray=not args.local_prepare)
    except (ConfigError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"fine-tuning {cfg.run.name} from {start_from} on {count} examples ({out})"
          + (f", LoRA rank {lora.rank}" if lora else ""))

    from raytrainer.launch import run_job

    return run_job(cfg)


if __name__ == "__main__":
    sys.exit(main())

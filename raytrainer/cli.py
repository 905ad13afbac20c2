"""`raytrainer prepare | plan | report | inspect | export | generate`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from raytrainer.config import ConfigError, load_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="YAML file or preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _checkpoint_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML file or preset name (default: the config the checkpoint was trained with)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def cmd_plan(args: argparse.Namespace) -> int:
    from raytrainer.planner import format_plan, plan

    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, tokens=args.tokens, gpus=args.gpus, mfu=args.mfu, peak_flops=args.peak_flops, gpu=args.gpu)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from raytrainer.report import format_report, require_run, run_report
    from raytrainer.report.document import ReportError, compare_document, write_run_report
    from raytrainer.storage import open_storage

    s3 = _s3_from_args(args)
    if args.compare:
        for url in args.compare:
            require_run(url, s3)
        runs = {url.rstrip("/").rsplit("/", 1)[-1]: open_storage(url, s3) for url in args.compare}
        out = args.out or "reports/" + "-vs-".join(runs)
        try:
            written = compare_document(runs).write(open_storage(out, s3))
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print("\n".join(f"wrote {w}" for w in written))
        return 0
    if not args.run:
        print("error: give --run RUN (or --compare RUN_A RUN_B)", file=sys.stderr)
        return 2
    report = run_report(args.run, s3=s3)
    run = open_storage(args.run, s3)
    written, no_plots = [], None  # the files first: a reader of the summary may go early (`| head`)
    try:
        if args.out:
            from raytrainer.report.document import run_document

            written = run_document(run, report["checkpoints"]).write(open_storage(args.out, s3))
        else:
            written = write_run_report(run, report["checkpoints"])
    except ReportError as e:
        no_plots = e
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    if no_plots is not None:
        sys.stdout.flush()
        print(f"no plots: {no_plots}", file=sys.stderr)
        return 1
    if not args.json:
        print("\n".join(f"wrote {w}" for w in written))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from raytrainer.report import inspect_checkpoint

    info = inspect_checkpoint(args.run, args.step, s3=_s3_from_args(args), verify=args.verify)
    print(json.dumps(info, indent=2, default=str))
    return 0 if info.get("complete", False) else 1


def cmd_export(args: argparse.Namespace) -> int:
    from raytrainer.export import export_hf, run_config, storage_access

    s3 = storage_access(args.overrides)
    cfg, step = run_config(args.run, args.step, args.config, args.overrides, s3)
    out = export_hf(cfg, args.run, args.out, step=step, use_ema=args.ema, s3=s3, dtype=args.dtype,
                    lossy=args.lossy, force=args.force, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"exported to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from raytrainer.export import generate, run_config, storage_access
    from raytrainer.sampling import Sampling

    try:
        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                            length_penalty=args.length_penalty, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"generate: {e}") from None
    s3 = storage_access(args.overrides)
    cfg, step = run_config(args.run, args.step, args.config, args.overrides, s3)
    texts = generate(cfg, args.run, args.prompt or ["def "], sampling, step=step, s3=s3, use_ema=args.ema)
    print("\n\n".join(texts))
    return 0


def _s3_from_args(args: argparse.Namespace):
    from raytrainer.config import S3Config

    return S3Config(endpoint_url=getattr(args, "endpoint_url", None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Listed for --help; main() hands its arguments to raytrainer.prepare_cli whole.
    sub.add_parser("prepare", help="tokenise raw text into a dataset, or validate one (see prepare --help)",
                   add_help=False)

    p = sub.add_parser("plan", help="parameters, FLOPs, Chinchilla tokens, wall time and GPU-hours")
    _config_args(p)
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 15e12")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--gpu", default="h100", help="GPU type for the peak FLOP/s (h100, h200, a100, ...)")
    p.add_argument("--peak-flops", type=float, default=None, help="override the peak FLOP/s per GPU")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    for name, func, helptext in (
        ("report", cmd_report, "a run's summary; writes report.md and report.html with plots"),
        ("inspect", cmd_inspect, "one checkpoint: state, files, completeness"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--run", required=name == "inspect", help="run directory: <checkpoint.storage>/<run.name>")
        p.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// runs (default: AWS)")
        p.add_argument("--json", action="store_true")
        if name == "report":
            p.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                           help="overlay the curves of these runs (writes to --out)")
            p.add_argument("--out", default=None, help="where report.md, report.html and the plots go "
                           "(default: <run>/report, or reports/<a>-vs-<b> with --compare)")
        if name == "inspect":
            p.add_argument("--step", type=int, default=None, help="default: the latest complete checkpoint")
            p.add_argument("--verify", action="store_true", help="check every file's sha256")
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="export a checkpoint as the same model in Hugging Face format (Llama, or "
                       "Qwen3 for QK-norm models) with its tokenizer")
    _checkpoint_config_args(p)
    p.add_argument("--run", required=True, help="run directory: <checkpoint.storage>/<run.name>")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the latest complete checkpoint")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit")
    p.add_argument("--lossy", action="store_true",
                   help="export features no HF architecture has (logit soft-capping, muP): a different model")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    _checkpoint_config_args(p)
    p.add_argument("--run", required=True, help="run directory: <checkpoint.storage>/<run.name>")
    p.add_argument("--prompt", action="append", default=None, help="repeat for a batch (default: 'def ')")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--greedy", action="store_true", help="the likeliest token each time")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length**this")
    p.add_argument("--step", type=int, default=None, help="default: the latest complete checkpoint")
    p.add_argument("--ema", action="store_true", help="sample from the EMA weights")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        from raytrainer import prepare_cli

        return prepare_cli.main(argv[1:], prog="raytrainer prepare")
    from raytrainer.data.manifest import DataError
    from raytrainer.storage import StorageError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that has gone is found here, not as Python exits
        return code
    except (ConfigError, DataError, StorageError) as e:  # ExportRefused and RunNotFound among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `raytrainer report ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""What happened in a run: `raytrainer report` (a summary, and report.md / report.html with plots) and
`raytrainer inspect` (one checkpoint)."""

from raytrainer.report.summary import format_report, inspect_checkpoint, open_run, run_report, split_run_url

__all__ = ["format_report", "inspect_checkpoint", "open_run", "run_report", "split_run_url"]

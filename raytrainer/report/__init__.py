"""What happened in a run: `raytrainer report` (a summary, and report.md / report.html with plots) and
`raytrainer inspect` (one checkpoint)."""

from raytrainer.report.summary import (
    RunNotFound,
    format_report,
    inspect_checkpoint,
    open_run,
    pick_checkpoint,
    require_run,
    run_report,
    split_run_url,
)

__all__ = ["RunNotFound", "format_report", "inspect_checkpoint", "open_run", "pick_checkpoint", "require_run",
           "run_report", "split_run_url"]

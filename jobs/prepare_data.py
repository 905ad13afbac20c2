"""Tokenise raw text into a training dataset, or validate one: `python jobs/prepare_data.py --help`.

The same command as `raytrainer prepare`; this file lets a checkout run it without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from raytrainer.prepare_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="jobs/prepare_data.py"))

"""Entry point: `accelerate launch launch/run.py RECIPE [key=value ...] [--dry-run] [--debug]`.

Also runs as plain `python launch/run.py RECIPE`. Errors print one line naming the file, row or
key and what to do, and exit with status 2 (no traceback unless --debug).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alignment.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))

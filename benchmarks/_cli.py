"""The fastkd command line from a benchmark script: each measurement runs as a user would run it."""
from __future__ import annotations

import os
import subprocess
import sys


def fastkd(*args: str) -> str:
    """``python -m fastkd ARGS`` (no progress bar); its standard output, or the script stops with its tail."""
    done = subprocess.run([sys.executable, "-m", "fastkd", *args], capture_output=True, text=True,
                          env={**os.environ, "FASTKD_PROGRESS": "0"})
    if done.returncode:
        raise SystemExit(f"fastkd {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout

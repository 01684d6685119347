"""The folder where fastkd keeps what it can make again: native builds, decoded image sets."""
from __future__ import annotations

import os
from pathlib import Path


def root() -> Path:
    """``$FASTKD_CACHE``, else ``$XDG_CACHE_HOME/fastkd``, else ``~/.cache/fastkd`` (not created here)."""
    if os.environ.get("FASTKD_CACHE"):
        return Path(os.environ["FASTKD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastkd"

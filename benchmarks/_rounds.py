"""Timed rounds of a benchmark, fewer when a time budget asks for it (gpu-check sets FASTKD_BENCH_ROUNDS)."""
from __future__ import annotations

import os


def rounds(full: int, least: int = 2) -> int:
    """``full`` times ``$FASTKD_BENCH_ROUNDS`` (a fraction; 1 when unset), never fewer than ``least``."""
    share = float(os.environ.get("FASTKD_BENCH_ROUNDS") or 1)
    return max(least, round(full * share))

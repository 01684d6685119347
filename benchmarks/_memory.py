"""Peak extra resident memory of one benchmark step, measured in a fresh process.

A step script (``crd_step.py``, ``logits_step.py``, ``similarity_step.py``) prints
:func:`peak_extra_bytes` of its step when run as ``python <script> ARGS``; :func:`in_fresh_process`
runs it so that no provider inherits another's freed memory. Linux only (``/proc/self``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(step: Callable[[], object]) -> int:
    """Peak resident memory while ``step()`` runs, beyond the process's memory before it."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def in_fresh_process(script: str, *args) -> int:
    """The number ``benchmarks/<script> ARGS`` prints, run in a new interpreter."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big buffers are mmapped and returned on free
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), script), *map(str, args)],
                         capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip())

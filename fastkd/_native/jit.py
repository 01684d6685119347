"""Compiles the native library for the installed torch with ``torch.utils.cpp_extension`` (ninja).

The compile runs in a child process that writes ``_C.so`` and ``build.log`` into a folder of the
build cache (:mod:`fastkd._native.cache`): cpp_extension loads what it builds, and this process
must load only the finished build, from its final place.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fastkd._native import cache
from fastkd._native.plan import Plan, cuda_arch_env

# The child: build, and load the result once, which also proves it loads (then exit).
_CHILD = "import json, sys; from torch.utils.cpp_extension import load; load(**json.loads(sys.argv[1]))"
_KEEP = {cache.LIBRARY, "build.log", "build.ninja"}
# Minutes of one core per C++ / CUDA source: the C++ ones took 7-37 s (sum 156 s) on the project's build machine.
MINUTES_PER_SOURCE = {False: 0.3, True: 1.5}


class Unavailable(Exception):
    """Why the native library cannot be had here (``reason``) and what to do about it (``fix``)."""

    def __init__(self, reason: str, fix: str):
        super().__init__(f"{reason}. {fix}")
        self.reason, self.fix = reason, fix


def compiler() -> str | None:
    """The C++ compiler torch would use: ``$CXX``, else ``c++`` on PATH (``None`` when there is none)."""
    return shutil.which(os.environ.get("CXX") or "c++")


def tool_path() -> str:
    """PATH for the compile: this interpreter's scripts folder and the ninja wheel's binaries first, so
    an environment that is used without being activated still finds its own ninja."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the ninja wheel (a dependency of fastkd)

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return os.pathsep.join(dirs + [os.environ.get("PATH", os.defpath)])


def ninja() -> str | None:
    return shutil.which("ninja", path=tool_path())


def check_tools() -> None:
    """Raise :class:`Unavailable` when the compiler or ninja is missing."""
    if compiler() is None:
        where = f"CXX={os.environ['CXX']} is not an executable" if os.environ.get("CXX") else "no `c++` on PATH"
        raise Unavailable(f"no C++ compiler was found ({where})",
                          "Install one (Debian/Ubuntu: `apt-get install g++`; conda: `conda install gxx`) or set CXX "
                          "to it, then run `fastkd build`")
    if ninja() is None:
        raise Unavailable("ninja, which torch compiles extensions with, was not found",
                          f"Install it into this environment (`{sys.executable} -m pip install ninja`), "
                          "then run `fastkd build`")


def estimate_minutes(plan: Plan) -> int:
    """A rough duration of the compile, for the message that announces it."""
    per_source = [MINUTES_PER_SOURCE[path.endswith(".cu")] for path in plan.sources]
    return math.ceil(max(max(per_source), sum(per_source) / min(len(per_source), os.cpu_count() or 1)))


def compile_into(folder: Path, plan: Plan) -> None:
    """Compile ``plan`` into ``folder`` (``_C.so``, ``build.log``); :class:`cache.Failed` when it fails."""
    args = dict(name="_C", sources=list(plan.sources), extra_cflags=list(plan.cxx), extra_cuda_cflags=list(plan.nvcc),
                extra_ldflags=list(plan.ldflags), build_directory=str(folder), with_cuda=plan.cuda, verbose=True)
    log_path = folder / "build.log"
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=folder,
                              env=dict(os.environ, PATH=tool_path(), **cuda_arch_env(plan.cuda)))
    if done.returncode != 0 or cache.library(folder) is None:
        raise cache.Failed(log_path.read_text(errors="replace"), log_path)
    for path in folder.iterdir():  # object files and ninja's state: a few MB that nothing reads again
        if path.name not in _KEEP:
            path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)


def first_errors(log: str, count: int = 6) -> list[str]:
    """The compiler's and linker's first error lines in a build log, each once (else the log's last lines)."""
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b:|undefined reference", line)]  # not Python's ...Error:
    return list(dict.fromkeys(errors))[:count] or lines[-count:]

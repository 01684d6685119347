"""``fastkd doctor``: what fastkd can run on this machine, and what is missing.

Prints the versions (Python, torch, CUDA, Triton), the tools a native build needs, where the native
library lives and whether it matches the installed torch, which backend runs each op on each
device, and the settings read from the environment. It compiles nothing. Exits 1 when something
this machine could run is missing: native kernels that are not built or do not load although a
C++ compiler is here, Triton on a machine with a GPU, CUDA kernels in a native build that could
have them; the lines under "missing" say what to do.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

import fastkd
from fastkd import _native
from fastkd.backends import _impls, backends, choose, current, implementations
from fastkd._native import cache, jit
from fastkd._native.plan import read_tag

SETTINGS = {  # variable: its default (what fastkd does when it is not set)
    "FASTKD_BACKEND": "auto", "FASTKD_VALUE_CHECKS": "1", "FASTKD_BUILD_NATIVE": "1", "FASTKD_REQUIRE_NATIVE": "0",
    "FASTKD_BUILD_CUDA": "1", "FASTKD_CACHE": "$XDG_CACHE_HOME/fastkd or ~/.cache/fastkd", "CXX": "c++",
    "FASTKD_COMPILE_BACKEND": "inductor", "TRITON_INTERPRET": "0",
}


def _version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def _line(name: str, text: str) -> None:
    print(f"{name:<14}{text}")


def _native_section(missing: list[str]) -> None:
    """Where the native library comes from, and whether it is there."""
    _native.settle_without_compiling()
    tools = jit.compiler() is not None and jit.ninja() is not None
    building = os.environ.get("FASTKD_BUILD_NATIVE", "1") != "0"
    try:
        plan = _native.current_plan()
    except jit.Unavailable as exc:
        _line("native", f"unavailable: {exc.reason}")
        missing.append(exc.fix)
        return
    error, loaded_from = _native.error(), _native.path()
    if loaded_from:
        _line("native", f"loaded from {loaded_from}")
        _line("", f"built for {read_tag(loaded_from)}")
    elif error:
        _line("native", f"not available: {error.reason}")
        if tools:
            missing.append(error.fix)
        else:
            _line("", error.fix)
    elif tools and building:
        _line("native", f"not built yet for torch {torch.__version__} (the first op call compiles it)")
        missing.append("Compile the native kernels now: `fastkd build`")
    else:
        why = "FASTKD_BUILD_NATIVE=0" if not building else "a C++ compiler and ninja are needed to build it"
        _line("native", f"not built ({why}): ops run on the torch reference")
    _line("  sources", str(plan.root))
    _line("  needs", plan.tag)
    _line("  cache", f"{cache.folder(plan.key)}")
    for path in _native.package_builds():
        why = plan.mismatch(read_tag(path))
        _line("  package", f"{path}: {'matches this torch' if why is None else 'ignored: it ' + why}")
    if cache.failed_log(cache.folder(plan.key)).is_file():
        _line("  failed", f"{cache.failed_log(cache.folder(plan.key))} (`fastkd build --force` retries)")
    if (loaded_from and torch.cuda.is_available() and plan.cuda
            and not torch._C._dispatch_has_kernel_for_dispatch_key("fastkd::crd_nce_cuda", "CUDA")):
        # only the package's own build can lack them: the cache keeps CUDA builds under their own key
        missing.append(f"{loaded_from} was built without CUDA kernels, which this machine can compile: delete it "
                       "and run `fastkd build`")


def _ops_section(missing: list[str]) -> None:
    """Which backend runs each op on each device, and the native kernels registered with torch."""
    try:
        _line("backends", ", ".join(backends()) + f"  (selected: {current()})")
    except ValueError as exc:  # a bad FASTKD_BACKEND
        _line("backends", f"error: {exc}")
        missing.append(str(exc))
        return
    except RuntimeError as exc:  # FASTKD_REQUIRE_NATIVE=1 without native kernels: the native section says why
        _line("backends", f"error: {exc}")
        return
    print(f"{'op':<22}{'cpu: runs (available)':<34}cuda: runs (available)")
    for op in sorted(_impls):
        cells = [f"{choose(op, d)} ({', '.join(implementations(op, d))})" for d in ("cpu", "cuda")]
        print(f"{op:<22}{cells[0]:<34}{cells[1]}")
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastkd::"))
    print("torch.ops.fastkd ops with a kernel for")
    for key in ("CPU", "CUDA"):
        have = [n.split("::")[1] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, key)]
        _line(f"  {key}", ", ".join(have) if have else "none")


def main() -> int:
    """Print the report; 1 when something this machine could run is missing."""
    missing: list[str] = []
    _line("fastkd", f"{fastkd.__version__} at {os.path.dirname(fastkd.__file__)}")
    _line("python", f"{sys.version.split()[0]} ({sys.implementation.cache_tag}) {sys.executable}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    _line("torch", f"{torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}, {gpus} GPU(s)")
    if importlib.util.find_spec("triton") is None:
        _line("triton", "not installed")
        if gpus:
            missing.append(f"Triton runs fastkd's GPU kernels: `{sys.executable} -m pip install triton`")
    else:
        import triton

        interpreter = " (its CPU interpreter: TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        _line("triton", f"{triton.__version__}{interpreter}")
    for name, path in (("C++ compiler", jit.compiler()), ("ninja", jit.ninja())):
        _line(name, f"{path} ({_version(path)})" if path else "not found")
    if torch.version.cuda is not None:
        from torch.utils.cpp_extension import CUDA_HOME

        _line("CUDA toolkit", CUDA_HOME or "not found (the native build gets no CUDA kernels)")
    _native_section(missing)
    _ops_section(missing)
    print("settings")
    for name, default in SETTINGS.items():
        value = os.environ.get(name)
        print(f"  {name}={value}" if value is not None else f"  {name} not set: {default}")
    if missing:
        print("missing")
        for fix in missing:
            print(f"  - {fix}")
    return 1 if missing else 0

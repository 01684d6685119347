"""Finds, builds and loads fastkd's native library ``fastkd._C`` for the installed torch.

The library registers CPU kernels (and CUDA kernels in a CUDA build) for schemas that
:mod:`fastkd.ops` defines in Python. It is taken from the first of:

1. ``fastkd/_C*.so`` in the package (setup.py's ahead-of-time build, in a wheel or a checkout),
   when its build tag (:mod:`fastkd._native.plan`) says it was built for this torch, this Python
   and these sources;
2. the build cache (:mod:`fastkd._native.cache`);
3. a compile into the cache (:mod:`fastkd._native.jit`), the first time :func:`loaded` is asked
   (the first op call or ``fastkd.backends()``), announced by one line on stderr.
   ``FASTKD_BUILD_NATIVE=0`` turns the compile off (no message; ops run on the torch reference).

When there is no library, a message on stderr says once why and what to do, and the ops run on
the torch reference; ``FASTKD_REQUIRE_NATIVE=1`` makes that an error. Nothing is loaded when it
was built for another torch: the tag is read from the file's bytes first.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import torch

from fastkd._native import cache, jit
from fastkd._native.jit import Unavailable
from fastkd._native.plan import Plan, plan_for, read_tag, source_root

PACKAGE = Path(__file__).resolve().parents[1]
_state: dict[str, object] = {}  # "loaded": bool once settled, "path", "error", "plan", "looked"
_told: set[str] = set()
_lock = threading.RLock()


def say(message: str) -> None:
    """A line on stderr, once per process."""
    if message not in _told:
        _told.add(message)
        print(message, file=sys.stderr, flush=True)


def _tell(exc: Unavailable) -> None:
    say(f"fastkd: the native kernels are not available, so fastkd's ops run on the slower torch reference.\n"
        f"fastkd:   why: {exc.reason}\n"
        f"fastkd:   fix: {exc.fix}\n"
        f"fastkd:   (`fastkd doctor` shows the set-up; FASTKD_BUILD_NATIVE=0 skips the build and this message, "
        f"FASTKD_REQUIRE_NATIVE=1 makes it an error)")


def current_plan() -> Plan:
    """The build that matches this process (:class:`Unavailable` when the C++ sources are missing)."""
    if "plan" not in _state:
        root = source_root(PACKAGE)
        if root is None:
            raise Unavailable(f"fastkd's C++ sources are not installed (looked in {PACKAGE / 'csrc'} and "
                              f"{PACKAGE.parent / 'csrc'})", "Reinstall fastkd from its repository, a wheel or an sdist")
        _state["plan"] = plan_for(root)
    return _state["plan"]  # type: ignore[return-value]


def package_builds() -> list[Path]:
    """Ahead-of-time builds in the package folder (``fastkd/_C<suffix>``)."""
    return [PACKAGE / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (PACKAGE / f"_C{suffix}").is_file()]


def _ready(build_plan: Plan, quiet: bool) -> Path | None:
    """A finished build for this process: the package's own, else the cache's."""
    cached = cache.library(cache.folder(build_plan.key))
    for path in package_builds():
        why = build_plan.mismatch(read_tag(path))
        if why is None:
            return path
        if not quiet:
            instead = f"using {cached} instead" if cached else "compiling the kernels into the cache instead"
            say(f"fastkd: ignoring {path}: it {why}; {instead} (delete the file to silence this)")
    return cached


def _import(path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fastkd._C", path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Unavailable(f"{path} could not be loaded: {first}",
                          "Rebuild it for this torch with `fastkd build --force` (or delete it)") from exc
    sys.modules["fastkd._C"] = module
    # which ops it registered kernels for, per dispatch key (read here, once: the backend table asks on every
    # op call, and inside torch.compile, where the dispatcher cannot be queried)
    _state["kernels"] = {key: frozenset(name.split("::", 1)[1] for name in
                                        torch._C._dispatch_get_registrations_for_dispatch_key(key)
                                        if name.startswith("fastkd::"))
                         for key in ("CPU", "CUDA")}


def build(force: bool = False) -> Path:
    """Compile the library for this torch into the cache (unless it is there and not ``force``); its path.

    Raises :class:`Unavailable` saying why it cannot be built.
    """
    build_plan = current_plan()
    jit.check_tools()
    folder = cache.folder(build_plan.key)

    def make(temporary: Path) -> None:
        minutes = jit.estimate_minutes(build_plan)
        say(f"fastkd: compiling the native kernels for torch {torch.__version__} into {folder} "
            f"(one time, about {minutes} min)…")
        start = time.perf_counter()
        jit.compile_into(temporary, build_plan)
        say(f"fastkd: compiled the native kernels in {time.perf_counter() - start:.0f} s")

    def waiting() -> None:
        say(f"fastkd: waiting for another process that is compiling the native kernels into {folder}…")

    try:
        return cache.build_once(folder, make, waiting=waiting, force=force)
    except cache.Failed as exc:
        lines = "\n".join(f"fastkd:     {line}" for line in jit.first_errors(exc.log))
        raise Unavailable(f"compiling the native kernels for torch {torch.__version__} failed; the first lines of "
                          f"{exc.log_path}:\n{lines}",
                          "Fix what the log says (a missing header or an old compiler), then `fastkd build --force` "
                          "retries; if it is fastkd's bug, report it with the log and `fastkd doctor`'s output") from None
    except OSError as exc:
        raise Unavailable(f"the build cache {cache.root()} is not writable ({exc})",
                          "Set FASTKD_CACHE to a writable folder") from None


def build_command(force: bool = False) -> int:
    """``fastkd build``: make sure a build for this torch is there, compiling it if need be; 0 when it is."""
    try:
        found = None if force else _ready(current_plan(), quiet=False)
        found = found or build(force=force)
    except Unavailable as exc:
        _tell(exc)
        return 1
    print(f"fastkd: the native kernels for torch {torch.__version__}: {found}")
    return 0


def _settle(compile_now: bool) -> None:
    """Load a ready build; with ``compile_now``, compile one when there is none, and settle the answer."""
    with _lock:
        if "loaded" in _state:
            return
        building = os.environ.get("FASTKD_BUILD_NATIVE", "1") != "0"
        try:
            path = _ready(current_plan(), quiet=not building)
            if path is None and not compile_now:
                _state["looked"] = True  # decided at the first use
                return
            if path is None and building:
                path = build()
            if path is not None:
                _import(path)
        except Unavailable as exc:
            _state.update(loaded=False, error=exc)
            _tell(exc)
            return
        _state.update(loaded=path is not None, path=path, error=None)


def load() -> bool:
    """Load a finished build, if there is one (called when fastkd.ops is imported; compiles nothing)."""
    if "loaded" not in _state and "looked" not in _state:  # each ops module calls this: look once
        _settle(compile_now=False)
    return bool(_state.get("loaded"))


def settle_without_compiling() -> None:
    """Settle on a finished build, or on none, compiling nothing (``fastkd doctor`` reports; it does not build)."""
    _settle(compile_now=False)
    _state.setdefault("loaded", False)


def _settled() -> bool:
    if "loaded" not in _state:
        _settle(compile_now=True)
    return bool(_state["loaded"])


def loaded() -> bool:
    """Whether the native kernels are loaded; the first call builds them if need be (see the module).

    Raises ``RuntimeError`` when they are not and ``FASTKD_REQUIRE_NATIVE=1``. Every op call asks:
    once settled, the answer costs a dictionary lookup.
    """
    found = _state.get("loaded")
    if found is None:
        found = _settled()
    if not found and os.environ.get("FASTKD_REQUIRE_NATIVE") == "1":
        why = _state.get("error") or "FASTKD_BUILD_NATIVE=0 and no finished build is there"
        raise RuntimeError(f"FASTKD_REQUIRE_NATIVE=1, but fastkd's native kernels are not available: {why}")
    return found


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded library registered a kernel of ``fastkd::<op>`` for ``dispatch_key`` (``"CPU"`` or
    ``"CUDA"``); False while no library is loaded. Compiles and loads nothing."""
    return op in _state.get("kernels", {}).get(dispatch_key, ())


def error() -> Unavailable | None:
    """Why the library is not loaded (``None`` when it is, or when building was turned off)."""
    _settled()
    return _state.get("error")  # type: ignore[return-value]


def path() -> Path | None:
    """The file the library was loaded from (``None`` when it is not loaded)."""
    _settled()
    return _state.get("path")  # type: ignore[return-value]

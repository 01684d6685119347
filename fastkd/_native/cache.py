"""The build cache: one folder per build, made once, under a file lock, and renamed into place.

The cache is ``$FASTKD_CACHE``, else ``$XDG_CACHE_HOME/fastkd``, else ``~/.cache/fastkd``; builds
live in its ``native/`` folder, one folder per key (:attr:`fastkd._native.plan.Plan.key`)::

    native/<key>/_C.so          a finished build (and its build.log)
    native/<key>.lock           taken (fcntl.flock) by the process that builds <key>
    native/<key>.failed         the log of the last failed build: not retried until asked (force)
    native/.<key>.tmp-*         a build in progress

A build is written into a temporary folder and renamed to ``<key>`` when it is complete, so a
reader finds either nothing or a whole build. The kernel releases the lock of a process that
dies, so a killed build blocks nobody; the next builder removes what it left.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from fastkd._cache import root

try:
    import fcntl
except ImportError:  # Windows: no flock; builders that meet may both build, but none sees a half-made build
    fcntl = None

LIBRARY = "_C.so"


class Failed(Exception):
    """A build failed (now or, remembered in ``<key>.failed``, before); ``log`` is its output."""

    def __init__(self, log: str, log_path: Path):
        super().__init__(f"building failed; log: {log_path}")
        self.log, self.log_path = log, log_path


def folder(key: str) -> Path:
    """Where the build named ``key`` lives (it may not exist yet)."""
    return root() / "native" / key


def library(build: Path) -> Path | None:
    """The finished library in the build folder ``build``, or ``None``."""
    path = build / LIBRARY
    return path if path.is_file() else None


def failed_log(build: Path) -> Path:
    return build.with_name(build.name + ".failed")


@contextmanager
def _locked(build: Path, waiting: Callable[[], None]) -> Iterator[bool]:
    """Hold ``<build>.lock``, calling ``waiting()`` first when another process holds it; yields whether the
    lock is held (not where flock is missing, on Windows, or refused, on some network file systems)."""
    with open(build.with_name(build.name + ".lock"), "a") as lock:
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting()
                fcntl.flock(lock, fcntl.LOCK_EX)
        except (AttributeError, OSError):  # fcntl is None, or no locks here
            yield False
        else:
            yield True  # closing the file releases the lock


def build_once(build: Path, make: Callable[[Path], None], *, waiting: Callable[[], None] = lambda: None,
               force: bool = False) -> Path:
    """The library in folder ``build``, made by ``make(temporary_folder)`` unless it is there already.

    Of the processes that ask at once one builds; the others wait for its lock and then use its
    build (or its failure). A build that failed before raises :class:`Failed` without building again,
    unless ``force``, which also replaces a finished build.
    """
    if not force and library(build):
        return library(build)
    _raise_if_failed(build, force)
    build.parent.mkdir(parents=True, exist_ok=True)
    with _locked(build, waiting) as alone:
        if not force and library(build):  # built by the process we waited for
            return library(build)
        _raise_if_failed(build, force)
        for stale in build.parent.glob(f".{build.name}.tmp-*") if alone else ():  # a killed build's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{build.name}.tmp-", dir=build.parent))
        try:
            make(temporary)
        except Failed as exc:
            failed_log(build).write_text(exc.log)
            shutil.rmtree(temporary, ignore_errors=True)
            raise Failed(exc.log, failed_log(build)) from None
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        failed_log(build).unlink(missing_ok=True)
        os.chmod(temporary, 0o755)  # mkdtemp made it private; a shared cache serves other users too
        if force and build.exists():  # the old build goes (a process that loaded it keeps its mapping)
            shutil.rmtree(build)
        try:
            os.rename(temporary, build)
        except OSError:  # without a lock (no flock here), another builder got there first: use its build
            shutil.rmtree(temporary, ignore_errors=True)
            if library(build) is None:
                raise
    return library(build)


def _raise_if_failed(build: Path, force: bool) -> None:
    log = failed_log(build)
    if not force and log.is_file():
        raise Failed(log.read_text(errors="replace"), log)

"""What gpu-check leaves in its out folder, and the device tool's limits on it.

The device tool brings back at most 8 files from ``$OUT``, 16 MiB each, no deeper than two folders, named in
letters, digits, '.', '_' and '-'. gpu-check writes six, all at the top level, each replaced atomically:

* ``summary.md``, ``summary.json``: the report (:mod:`gpucheck.summary`), rewritten after every change;
* ``env.json``: the environment stage's result;
* ``tests.json``, ``benchmarks.json``: a record per test / benchmark case (:mod:`gpucheck.report`);
* ``logs.tar.gz``: every stage's log and records, the build's own log, pytest-benchmark's JSON files.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Callable

from gpucheck import summary

FILES = ("summary.md", "summary.json", "env.json", "tests.json", "benchmarks.json", "logs.tar.gz")
MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 1024 * 1024, 2
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a temporary file beside ``path`` and rename it, so a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(temporary, path)


def problems(out: Path) -> list[str]:
    """What in ``out`` would not come back through the device tool (empty when all of it would)."""
    found, files = [], [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES:
        found.append(f"{len(files)} files, more than {MAX_FILES}")
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        if not _NAME.match(path.name):
            found.append(f"{rel}: a name with other characters than letters, digits, '.', '_', '-'")
        if path.is_file() and len(rel.parts) - 1 > MAX_DEPTH:
            found.append(f"{rel}: deeper than {MAX_DEPTH} folders")
        if path.is_file() and path.stat().st_size > MAX_BYTES:
            found.append(f"{rel}: over {MAX_BYTES // (1024 * 1024)} MiB")
    return found


def clear(out: Path) -> None:
    """Remove what an earlier gpu-check left in ``out`` (only its own files)."""
    for name in FILES:
        for path in (out / name, out / f".{name}.tmp"):
            path.unlink(missing_ok=True)


def tail(log: Path, lines: int = 12, width: int = 240) -> list[str]:
    """The last lines of a stage's log (a build's first errors, a crash), each cut to ``width``."""
    try:
        found = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:width] for line in found if line.strip()][-lines:]


def read_records(work: Path, keys: list[str]) -> list[dict]:
    records = []
    for key in keys:
        path = work / f"{key}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:  # a line cut by a kill
                    continue
    return records


class Publisher:
    """Called with the stage results after every change: rewrites the report files and the logs' archive."""

    def __init__(self, out: Path, work: Path, budget: float, dry_run: bool,
                 extra_logs: Callable[[], list[Path]] = list, notes: list[str] | None = None):
        self.out, self.work, self.budget, self.dry_run = out, work, budget, dry_run
        self.extra_logs, self.notes = extra_logs, list(notes or [])
        self.t0 = time.monotonic()
        self.final = False
        self.last: dict | None = None

    def __call__(self, results) -> None:
        stages = [r.as_dict() for r in results]
        tests = [s["key"] for s in stages if s["kind"] == "tests"]
        benches = [s["key"] for s in stages if s["kind"] == "bench"]
        test_records, bench_records = read_records(self.work, tests), read_records(self.work, benches)
        try:
            env = json.loads((self.out / "env.json").read_text())
        except (OSError, ValueError):
            env = {}
        final = self.final or all(s["status"] not in ("pending", "running") for s in stages)
        tails = {s["key"]: tail(self.work / f"{s['key']}.log") for s in stages if s["status"] in ("failed", "cut")}
        rep = summary.report(stages, test_records + bench_records, env, self.budget,
                             time.monotonic() - self.t0, final, self.dry_run, self.notes, tails)
        self.last = rep
        write_atomic(self.out / "tests.json", json.dumps(summary.merge(test_records), indent=0))
        write_atomic(self.out / "benchmarks.json", json.dumps(summary.merge(bench_records), indent=0))
        write_atomic(self.out / "summary.json", json.dumps(rep, indent=1))
        write_atomic(self.out / "summary.md", summary.markdown(rep))
        self._archive()

    def _archive(self) -> None:
        temporary = self.out / ".logs.tar.gz.tmp"
        with tarfile.open(temporary, "w:gz") as tar:
            for path in sorted(self.work.iterdir()):
                _add(tar, path, f"logs/{path.name}")
            for path in self.extra_logs():
                _add(tar, path, f"logs/build/{path.parent.name}-{path.name}")
        os.replace(temporary, self.out / "logs.tar.gz")


def _add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    """Add the file as it is now (read whole first: a running stage may still be writing it, a build folder may
    be renamed away); a file that is gone is left out."""
    try:
        data = path.read_bytes()
    except OSError:
        return
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))

"""Runs gpu-check's stages inside a budget: one process group per stage, a time limit for each, and the
results handed to a publisher after every change, so that a run stopped at any point leaves a summary.

A background stage (the build) starts before the first stage and is waited for at its place in the list.
A stage that outlives its allowance (:func:`gpucheck.plan.allowance`) is stopped (SIGTERM to its group,
SIGKILL after ``grace`` seconds) and marked "cut by the time limit"; a stage whose minimum no longer fits
is "not run: budget". When gpu-check itself is stopped (SIGTERM, SIGINT) it stops the running stages,
marks them and publishes before it exits.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from gpucheck.plan import Stage, allowance
from gpucheck.summary import seconds


class Stopped(BaseException):
    """gpu-check received a signal to stop (a BaseException: no ``except Exception`` swallows it)."""


@dataclass
class Result:
    """What happened to one stage; ``status`` is pending, running, ok, failed, cut or not run."""

    key: str
    title: str
    kind: str
    slice: float
    status: str = "pending"
    reason: str = ""
    allowance: float | None = None
    seconds: float | None = None
    rc: int | None = None
    rounds: float | None = None   # benchmark rounds as a fraction of the full count (1 = all)

    def as_dict(self) -> dict:
        found = asdict(self)
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in found.items()}


def stage_env(stage: Stage, root: Path, work: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment of a stage's process (see the README's gpu-check section for what each means)."""
    env = dict(base)
    paths = [str(root), str(root / "scripts")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", FASTKD_PROGRESS="0",
               GPUCHECK_RECORDS=str(work / f"{stage.key}.jsonl"), GPUCHECK_STAGE=stage.key)
    env.setdefault("FASTKD_CACHE", str(root / ".cache" / "fastkd"))
    if stage.kind == "build":
        env.setdefault("MAX_JOBS", "16")
    elif stage.kind in ("tests", "bench"):
        env["FASTKD_BUILD_NATIVE"] = "0"  # use the build stage's library; never compile (or wait for a lock) here
    return env


class Runner:
    """Runs ``plan`` (stages with their ``slices``) within ``budget`` seconds; ``publish(results)`` is called
    whenever a result changes."""

    def __init__(self, plan: list[Stage], slices: dict[str, float], budget: float, reserve: float, root: Path,
                 out: Path, work: Path, publish: Callable[[list[Result]], None], grace: float = 2.0,
                 say: Callable[[str], None] = lambda line: print(line, flush=True),
                 base_env: dict[str, str] | None = None):
        self.plan, self.slices, self.budget, self.reserve = plan, slices, budget, reserve
        self.root, self.out, self.work, self.publish, self.grace, self.say = root, out, work, publish, grace, say
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.results = {s.key: Result(s.key, s.title, s.kind, slices[s.key]) for s in plan}
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.t0 = 0.0

    # --- processes -------------------------------------------------------------------------------
    def _command(self, stage: Stage) -> list[str]:
        fill = {"{python}": sys.executable, "{out}": str(self.out), "{work}": str(self.work)}
        parts = []
        for part in stage.command:
            for name, value in fill.items():
                part = part.replace(name, value)
            parts.append(part)
        return parts

    def _start(self, stage: Stage, rounds: float | None = None) -> None:
        env = stage_env(stage, self.root, self.work, self.base_env)
        if rounds is not None:
            env["FASTKD_BENCH_ROUNDS"] = f"{rounds:.2f}"
        self.started[stage.key] = time.monotonic()
        result = self.results[stage.key]
        with open(self.work / f"{stage.key}.log", "w") as log:  # the child keeps its own copy of the file
            log.write("$ " + " ".join(self._command(stage)) + "\n")
            log.flush()
            try:
                self.procs[stage.key] = subprocess.Popen(self._command(stage), cwd=self.root, env=env, stdout=log,
                                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                         start_new_session=True)
            except OSError as exc:
                result.status, result.reason, result.seconds = "failed", f"could not start: {exc}", 0.0
                return
        result.status = "running"

    def _stop(self, key: str) -> None:
        """SIGTERM to the stage's process group, SIGKILL after the grace period."""
        proc = self.procs[key]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(self.grace)
                if sig == signal.SIGTERM:
                    try:  # what the leader left behind in its group
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            except subprocess.TimeoutExpired:
                continue

    def _wait(self, key: str, limit: float) -> None:
        """Wait up to ``limit`` seconds for the stage, stop it past that, and record the outcome."""
        if key not in self.procs:  # it could not start
            return
        proc, result = self.procs[key], self.results[key]
        try:
            rc = proc.wait(max(limit, 0.0))
        except subprocess.TimeoutExpired:
            self._stop(key)
            result.status, result.reason = "cut", f"cut by the time limit ({seconds(result.allowance)})"
        else:
            result.rc = rc
            result.status = "ok" if rc == 0 else "failed"
            result.reason = "" if rc == 0 else _exit_reason(self.plan_by_key(key), rc)
        result.seconds = time.monotonic() - self.started[key]

    def plan_by_key(self, key: str) -> Stage:
        return next(s for s in self.plan if s.key == key)

    # --- the run ---------------------------------------------------------------------------------
    def left(self) -> float:
        return self.t0 + self.budget - self.reserve - time.monotonic()

    def _skip(self, stages: list[Stage], reason: str) -> None:
        for stage in stages:
            result = self.results[stage.key]
            if stage.key in self.procs and self.procs[stage.key].poll() is None:
                self._stop(stage.key)
                result.seconds = time.monotonic() - self.started[stage.key]
                result.status, result.reason = "cut", reason
            elif result.status in ("pending", "running"):
                result.status, result.reason = "not run", reason

    def _publish(self) -> None:
        """Hand the results to the publisher; a fault in writing them is told, and the check goes on."""
        try:
            self.publish(self.ordered())
        except Exception:  # noqa: BLE001 (the stages are worth more than one summary)
            traceback.print_exc()

    def run(self) -> list[Result]:
        self.t0 = time.monotonic()
        order = list(self.plan)
        try:
            self._publish()
            for stage in order:
                if stage.background:
                    self._start(stage)
                    self.say(self._line(stage, "started in the background"))
            for i, stage in enumerate(order):
                self._run_one(stage, order[i + 1:])
                self._publish()
                if stage.kind == "env" and self._no_gpu():
                    self._skip(order[i + 1:], "not run: no CUDA device (see the environment stage)")
                    break
        except Stopped:
            self._skip(order, "stopped: gpu-check received a signal")
        finally:
            self._skip(order, "not run: budget")  # a background stage nobody waited for
            self._publish()
        return self.ordered()

    def _run_one(self, stage: Stage, after: list[Stage]) -> None:
        result = self.results[stage.key]
        left = self.left()
        result.allowance = allowance(stage, left, self.slices, after)
        if result.allowance < stage.minimum:
            self._skip([stage], f"not run: budget ({seconds(max(left, 0))} left, needs {seconds(stage.minimum)})")
            return
        if stage.background:
            # waited for here: its allowance counts from now, on top of what it ran already
            self.say(self._line(stage, f"waiting up to {seconds(result.allowance)}"))
        else:
            if stage.kind == "bench":
                result.rounds = rounds_fraction(result.allowance, stage.estimate)
            self._start(stage, result.rounds)
            self.say(self._line(stage, f"started (allowance {seconds(result.allowance)})"))
            self._publish()
        self._wait(stage.key, result.allowance)
        self.say(self._line(stage, f"{result.status} after {seconds(result.seconds)} {result.reason}".rstrip()))

    def _no_gpu(self) -> bool:
        try:
            return not json.loads((self.out / "env.json").read_text()).get("cuda_available", False)
        except (OSError, ValueError):
            return False  # unknown: go on

    def _line(self, stage: Stage, what: str) -> str:
        return f"gpu-check [{time.monotonic() - self.t0:5.1f} s] {stage.key}: {what}"

    def ordered(self) -> list[Result]:
        return [self.results[s.key] for s in self.plan]


def rounds_fraction(allowance_s: float, estimate: float) -> float:
    """The share of a benchmark's full rounds that fits: 1 when the allowance covers the estimate."""
    return 1.0 if allowance_s >= estimate else max(0.25, round(allowance_s / estimate, 2))


def _exit_reason(stage: Stage, rc: int) -> str:
    if stage.kind in ("tests", "bench"):
        meaning = {1: "some tests failed", 2: "interrupted (a collection error?)", 3: "pytest's internal error",
                   4: "pytest's usage error", 5: "no tests collected"}
        return f"pytest exit {rc}: {meaning.get(rc, 'see the log')}"
    return f"exit status {rc}" + (f" (signal {-rc})" if rc < 0 else "")

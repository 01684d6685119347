"""A pytest plugin that writes one JSON line per test as soon as the test ends (``-p gpucheck.report``).

gpu-check reads these lines instead of pytest's closing summary, so a stage killed at its time limit
still leaves every test that finished before it: nodeid, outcome, duration, the first line of a failure,
the test's parameters and, for a pytest-benchmark test, its timings and ``extra_info``.

The file is ``$GPUCHECK_RECORDS`` (nothing is written when it is unset); ``$GPUCHECK_STAGE`` is copied into
each line. Under pytest-xdist only the controller writes (it receives every worker's reports).
"""
from __future__ import annotations

import json
import os

import pytest

_STATS = ("median", "min", "max", "mean", "stddev", "rounds")


def first_line(report) -> str:
    """The line that says what went wrong: the exception's message, else the report's first line."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:  # a skip: (path, line, reason)
        text = str(report.longrepr[2])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _plain(value):
    """``value`` as JSON can hold it (dtypes, devices and the like as their str)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def benchmark_record(fixture) -> dict | None:
    """Timings (seconds) and extra_info of a pytest-benchmark fixture that ran, else ``None``."""
    meta = getattr(fixture, "stats", None)
    stats = getattr(meta, "stats", None)
    if stats is None:
        return None
    found = {name: getattr(stats, name, None) for name in _STATS}
    found.update(group=getattr(fixture, "group", None), extra_info=_plain(dict(getattr(fixture, "extra_info", {}))))
    return found


class Recorder:
    """Appends a line to ``path`` for each test's outcome (a failed setup or teardown counts as an error)."""

    def __init__(self, path: str, stage: str):
        self.path, self.stage = path, stage
        self.extra: dict[str, dict] = {}

    def write(self, record: dict) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(dict(record, stage=self.stage)) + "\n")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        yield
        if call.when == "setup":  # a test skipped by a marker ends here: keep its parameters all the same
            callspec = getattr(item, "callspec", None)
            self.extra[item.nodeid] = {"params": _plain(dict(callspec.params)) if callspec else {}}
        elif call.when == "call":  # the fixtures are alive: keep a benchmark's numbers
            bench = benchmark_record(getattr(item, "funcargs", {}).get("benchmark"))
            if bench is not None:
                self.extra.setdefault(item.nodeid, {})["benchmark"] = bench

    def pytest_runtest_logreport(self, report):
        failed = report.failed and report.when != "call"
        if report.when == "call" or failed or (report.when == "setup" and report.skipped):
            outcome = "error" if failed else report.outcome
            record = {"nodeid": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3)}
            if outcome != "passed":
                record["message"] = first_line(report)
            record.update(self.extra.pop(report.nodeid, {}))
            self.write(record)

    def pytest_collectreport(self, report):
        if report.failed:
            self.write({"nodeid": report.nodeid, "outcome": "error", "seconds": 0.0,
                        "message": "collection: " + first_line(report)})


def pytest_configure(config):
    path = os.environ.get("GPUCHECK_RECORDS")
    if path and not hasattr(config, "workerinput"):  # not on an xdist worker
        config.pluginmanager.register(Recorder(path, os.environ.get("GPUCHECK_STAGE", "")), "gpucheck-recorder")

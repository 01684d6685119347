"""Side-by-side table of two sets of pytest-benchmark runs (say, the commit before a change and the change,
run alternately on one machine), for benchmarks/results/.

    python benchmarks/compare_runs.py BEFORE.json [...] -- AFTER.json [...] [--merge OUT.json]

Each side may hold several runs of the same suites: per benchmark, the table gives the median of the runs'
medians and the minimum over every round of every run, before and after, and their ratios (after / before:
above 1 is slower). A shared machine moves single runs by tens of percent, so read a ratio against the spread
of the runs (the last column: the largest over the smallest of one side's run medians). ``--merge`` writes both
sides' runs into one JSON file, as pytest-benchmark wrote them less each round's time (the statistics stay).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def runs(paths: list[str]) -> dict[str, list[dict]]:
    """benchmark fullname -> its stats in each run."""
    found: dict[str, list[dict]] = {}
    for path in paths:
        for bench in json.loads(Path(path).read_text())["benchmarks"]:
            found.setdefault(bench["fullname"], []).append(bench["stats"])
    return found


def _without_rounds(path: str) -> dict:
    run = json.loads(Path(path).read_text())
    for bench in run["benchmarks"]:
        bench["stats"].pop("data", None)
    return run


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


def table(before: dict[str, list[dict]], after: dict[str, list[dict]]) -> str:
    rows = ["| benchmark | before: median (min) | after: median (min) | ratio of medians | ratio of mins | "
            "spread of run medians (before / after) |", "| --- | --- | --- | --- | --- | --- |"]
    for name in sorted(before.keys() & after.keys()):
        sides = []
        for stats in (before[name], after[name]):
            medians = [s["median"] for s in stats]
            sides.append((statistics.median(medians), min(s["min"] for s in stats), max(medians) / min(medians)))
        (m0, n0, s0), (m1, n1, s1) = sides
        short = name.split("::", 1)[1]
        rows.append(f"| {short} | {_time(m0)} ({_time(n0)}) | {_time(m1)} ({_time(n1)}) | {m1 / m0:.2f} | "
                    f"{n1 / n0:.2f} | {s0:.2f} / {s1:.2f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    merge = None
    if "--merge" in argv:
        at = argv.index("--merge")
        merge, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    at = argv.index("--")
    before, after = argv[:at], argv[at + 1:]
    print(table(runs(before), runs(after)))
    if merge:
        Path(merge).write_text(json.dumps({side: {Path(path).name: _without_rounds(path) for path in paths}
                                           for side, paths in (("before", before), ("after", after))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

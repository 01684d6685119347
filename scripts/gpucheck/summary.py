"""gpu-check's summary: one report (stages, targets of issues 3-6, failures, benchmark medians) as
markdown for people (``summary.md``) and as compact JSON (``summary.json``), rebuilt after every stage."""
from __future__ import annotations

import time

from gpucheck.targets import MIB, Records, evaluate

_WORST = {"error": 3, "failed": 2, "skipped": 1, "passed": 0}


def merge(records: list[dict]) -> list[dict]:
    """One record per test and stage: a test that failed in its call and again in its teardown counts once."""
    kept: dict[tuple, dict] = {}
    for record in records:
        key = (record.get("stage"), record["nodeid"])
        if key not in kept or _WORST.get(record["outcome"], 0) > _WORST.get(kept[key]["outcome"], 0):
            kept[key] = record
    return list(kept.values())


def counts(records: list[dict], stage: str) -> dict[str, int]:
    mine = [r for r in records if r.get("stage") == stage]
    return {o: n for o in _WORST if (n := sum(r["outcome"] == o for r in mine))}


def bench_rows(records: list[dict]) -> list[dict]:
    """Each benchmark that ran: its case, median and min (ms), rounds, peak extra memory (MiB), extra figures."""
    rows = []
    for record in records:
        bench = record.get("benchmark")
        if not bench:
            continue
        extra = bench.get("extra_info", {})
        row = {"case": record["nodeid"].replace("benchmarks/", ""), "median_ms": _ms(bench.get("median")),
               "min_ms": _ms(bench.get("min")), "rounds": bench.get("rounds")}
        if extra.get("peak_extra_bytes") is not None:
            row["peak_extra_mib"] = round(extra["peak_extra_bytes"] / MIB, 2)
        for name in ("images_per_s", "gather_bytes_per_s"):
            if extra.get(name) is not None:
                row[name] = round(extra[name], 1)
        rows.append(row)
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 4)


def report(stages: list[dict], records: list[dict], env: dict, budget: float, elapsed: float, final: bool,
           dry_run: bool, notes: list[str], tails: dict[str, list[str]] | None = None) -> dict:
    """The whole summary as one JSON-able dict (what summary.json holds)."""
    records = merge(records)
    by_key = {s["key"]: s for s in stages}
    for stage in stages:
        if stage["kind"] in ("tests", "bench"):
            stage["tests"] = counts(records, stage["key"])
    failures = [{"nodeid": r["nodeid"], "outcome": r["outcome"], "message": r.get("message", "")}
                for r in records if r["outcome"] in ("failed", "error")]
    device = {k: env.get(k) for k in ("gpu", "memory_gib", "capability", "sms", "torch", "torch_cuda", "triton",
                                      "nvcc", "driver", "python", "copy_bytes_per_s", "bf16_matmul_tflops")
              if env.get(k) is not None}
    return {"dry_run": dry_run, "final": final, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "budget_s": budget, "elapsed_s": round(elapsed, 1), "device": device, "stages": stages,
            "targets": evaluate(Records(records, by_key, env)), "failures": failures,
            "benchmarks": bench_rows(records), "log_tails": tails or {}, "notes": notes}


def markdown(rep: dict) -> str:
    """summary.md: the same content as :func:`report`, for reading."""
    out = ["# fastkd GPU check" + (" — DRY RUN (simulated stages: every number below is made up)"
                                  if rep["dry_run"] else "")]
    state = "final" if rep["final"] else "written while the check ran (it may have been stopped after this)"
    out.append(f"\n{rep['written']}; budget {seconds(rep['budget_s'])}, {seconds(rep['elapsed_s'])} elapsed; {state}.")
    out.append("\n" + _device_line(rep["device"]))
    out += ["\n## Stages\n", "| # | stage | status | time / allowance (slice) | tests | note |", "| --- " * 6 + "|"]
    for n, s in enumerate(rep["stages"], 1):
        spent = "" if s.get("seconds") is None else seconds(s["seconds"])
        allowed = "" if s.get("allowance") is None else f" / {seconds(s['allowance'])}"
        tests = ", ".join(f"{v} {k}" for k, v in s.get("tests", {}).items())
        note = s.get("reason", "")
        if s.get("rounds") is not None and s["rounds"] < 1:
            note = (note + "; " if note else "") + f"fewer rounds: {s['rounds']:.0%} of the full count"
        out.append(f"| {n} | {s['key']}: {s['title']} | **{s['status']}** | {spent}{allowed} ({seconds(s['slice'])}) | "
                   f"{tests} | {note} |")
    out += ["\n## Targets of issues 3-6\n", "| issue | target | measured | met |", "| --- | --- | --- | --- |"]
    for t in rep["targets"]:
        met = "—" if t["info"] else {True: "**yes**", False: "**no**", None: "not run"}[t["met"]]
        out.append(f"| {t['issue']} | {t['target']} | {t['measured']} | {met} |")
    out.append(f"\n## Failures ({len(rep['failures'])})\n")
    out += [f"- `{f['nodeid']}` ({f['outcome']}): {f['message']}" for f in rep["failures"]] or ["none"]
    out += ["\n## Benchmarks (medians)\n", "| case | median ms | min ms | rounds | peak extra MiB | other |",
            "| --- " * 6 + "|"]
    for b in rep["benchmarks"]:
        other = ", ".join(f"{k} {b[k]:.4g}" for k in ("images_per_s", "gather_bytes_per_s") if k in b)
        out.append(f"| {b['case']} | {b['median_ms']} | {b['min_ms']} | {b['rounds']} | "
                   f"{b.get('peak_extra_mib', '')} | {other} |")
    for key, lines in rep["log_tails"].items():
        out += [f"\n## The end of {key}'s log ({_status(rep, key)})\n", "```"] + lines + ["```"]
    if rep["notes"]:
        out += ["\n## Notes\n"] + [f"- {note}" for note in rep["notes"]]
    out.append("\nFiles: env.json (stage 1), tests.json and benchmarks.json (a record per test), logs.tar.gz "
               "(each stage's log, the build log, pytest-benchmark's JSON).")
    return "\n".join(out) + "\n"


def digest(rep: dict, width: int = 160, failures: int = 10) -> str:
    """A short form of the summary for the end of the output (the device tool returns its last 12,000
    characters): a line per stage and per target, the first failures."""
    def cut(line: str) -> str:
        return line if len(line) <= width else line[:width - 1] + "…"

    out = ["gpu-check summary" + (" (DRY RUN, made-up numbers)" if rep["dry_run"] else "") +
           f": {_device_line(rep['device'])}", "stages:"]
    for s in rep["stages"]:
        tests = ", ".join(f"{v} {k}" for k, v in s.get("tests", {}).items())
        spent = "" if s.get("seconds") is None else f" {seconds(s['seconds'])}"
        status = s["reason"] if s.get("reason", "").startswith(s["status"]) else \
            f"{s['status']} {s.get('reason', '')}".strip()
        out.append(cut(f"  {s['key']}: {status}{spent}" + (f" [{tests}]" if tests else "")))
    out.append("targets (issue: met | measured | target):")
    for t in rep["targets"]:
        met = "info" if t["info"] else {True: "YES", False: "NO", None: "not run"}[t["met"]]
        out.append(cut(f"  {t['issue']}: {met} | {t['measured']} | {t['target']}"))
    out.append(f"failures: {len(rep['failures'])}")
    out += [cut(f"  {f['nodeid']}: {f['message']}") for f in rep["failures"][:failures]]
    return "\n".join(out) + "\n"


def _status(rep: dict, key: str) -> str:
    found = next(s for s in rep["stages"] if s["key"] == key)
    return found.get("reason") or found["status"]


def seconds(value: float) -> str:
    """A duration for reading: whole seconds, tenths under ten."""
    return f"{value:.0f} s" if abs(value) >= 10 else f"{value:.1f} s"


def _device_line(device: dict) -> str:
    if not device:
        return "Device: not known (the environment stage has not written env.json)."
    parts = [device.get("gpu", "no GPU")]
    if "memory_gib" in device:
        parts.append(f"{device['memory_gib']:.1f} GiB")
    if "capability" in device:
        parts.append(f"sm_{device['capability'].replace('.', '')}, {device.get('sms', '?')} SMs")
    for key in ("torch", "torch_cuda", "triton", "nvcc", "driver", "python"):
        if key in device:
            parts.append(f"{key.replace('_', ' ')} {device[key]}")
    if "copy_bytes_per_s" in device:
        parts.append(f"copy bandwidth {device['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")
    if "bf16_matmul_tflops" in device:
        parts.append(f"bf16 matmul {device['bf16_matmul_tflops']:.0f} TFLOP/s")
    return "Device: " + "; ".join(parts) + "."

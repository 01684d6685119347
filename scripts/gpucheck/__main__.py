"""``python -m gpucheck [--budget SECONDS] [--out DIR] [--dry-run] [--only KEYS]``: ``bash scripts/dev gpu-check``.

Runs every GPU check of fastkd in one call within the budget and leaves the summary in the out folder
(``$OUT`` when set, else ``gpu-check-out/``); ``--dry-run`` prints the plan and runs it with stand-in stages.
Run it from the repository root with the machine's own python3: it installs nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from gpucheck import dry_run, outfolder, summary
from gpucheck import plan as planning
from gpucheck.runner import Runner, Stopped

ROOT = Path(__file__).resolve().parents[2]


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def build_logs() -> list[Path]:
    """The native build's own logs (the finished build's, one in progress, a failed one's)."""
    cache = Path(os.environ.get("FASTKD_CACHE") or ROOT / ".cache" / "fastkd") / "native"
    return sorted(cache.glob("*/build.log")) + sorted(cache.glob(".*/build.log")) + sorted(cache.glob("*.failed"))


def run(stages, budget: float, reserve: float, out: Path, dry: bool, grace: float, notes: list[str]) -> list:
    out.mkdir(parents=True, exist_ok=True)
    outfolder.clear(out)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    publisher = outfolder.Publisher(out, work, budget, dry, extra_logs=lambda: [] if dry else build_logs(),
                                    notes=notes)
    runner = Runner(stages, planning.slices(stages, budget, reserve), budget, reserve, ROOT, out, work, publisher,
                    grace=grace)
    try:
        results = runner.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if publisher.last is not None:
        print("\n" + summary.digest(publisher.last) + f"the whole summary: {out / 'summary.md'}", flush=True)
    left = outfolder.problems(out)
    if left:
        print("gpu-check: the out folder would not come back whole: " + "; ".join(left), file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=planning.DEFAULT_BUDGET,
                        help="seconds for the whole check, the summary included "
                             f"(default {planning.DEFAULT_BUDGET:.0f})")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the results go (default $OUT, else gpu-check-out)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, then simulate it with stand-in stages")
    parser.add_argument("--only", default="", metavar="KEY[,KEY...]",
                        help="run these stages only (and the environment stage), e.g. for a second call")
    args = parser.parse_args(argv)
    if args.budget < 60 and not args.dry_run:
        parser.error("--budget must be at least 60 seconds")
    try:
        stages = planning.only(planning.stages(), args.only)
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out or Path(os.environ.get("OUT") or ROOT / "gpu-check-out")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(dry_run.describe(stages, args.budget, planning.RESERVE), flush=True)
    if args.dry_run:
        fakes, budget, reserve = dry_run.simulated(stages, args.budget)
        print(f"\ngpu-check: simulating that plan in {budget:.0f} s with stand-in stages ({dry_run.HANGS} hangs) "
              f"into {out}\n", flush=True)
        results = run(fakes, budget, reserve, out, True, grace=0.3,
                      notes=[f"dry run: the plan for {args.budget:.0f} s compressed into {budget:.0f} s; "
                             f"{dry_run.HANGS} stands in for a stage that hangs"])
        expected = {r.key: r.status for r in results}
        return 0 if expected.get(dry_run.HANGS) == "cut" else 1
    print(f"\ngpu-check: running into {out}\n", flush=True)
    results = run(stages, args.budget, planning.RESERVE, out, False, grace=3.0, notes=[])
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

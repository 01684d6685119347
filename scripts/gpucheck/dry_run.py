"""``gpu-check --dry-run``: the plan for a budget, then the same plan run fast with stand-in stages.

The simulation compresses every duration of the plan into :data:`SIMULATED_BUDGET` seconds and replaces each
command with :mod:`gpucheck.fake`, which writes made-up records and sleeps for half of its stage's slice,
except :data:`HANGS`, which never ends: it is cut by the time limit, taking with it the time the last stage
needed, which is then not run for the budget. The summary, its JSON and the logs land in the out folder as
in a real run.
"""
from __future__ import annotations

from dataclasses import replace

from gpucheck import plan as planning

SIMULATED_BUDGET = 8.0
HANGS = "bench-similarity"
FAKE_SHARE = 0.5  # of its slice, each stand-in sleeps this much


def describe(stages: list[planning.Stage], budget: float, reserve: float) -> str:
    """The stage list with the time each is given under ``budget``."""
    shares = planning.slices(stages, budget, reserve)
    lines = [f"gpu-check plan for a budget of {budget:.0f} s ({reserve:.0f} s kept for the last summary); a stage "
             f"may run to {planning.STRETCH:g}x its slice plus what the stages before it saved:",
             f"{'#':>2}  {'stage':<17}{'estimate':>9}{'slice':>8}{'minimum':>9}  what"]
    for n, stage in enumerate(stages, 1):
        where = " (started at 0 s, in the background)" if stage.background else ""
        lines.append(f"{n:>2}  {stage.key:<17}{stage.estimate:>8.0f}s{shares[stage.key]:>7.0f}s"
                     f"{stage.minimum:>8.0f}s  {stage.title}{where}")
    lines.append("commands (run in the repository root; {python} is this interpreter):")
    lines += [f"  {stage.key}: {' '.join(stage.command)}" for stage in stages]
    return "\n".join(lines)


def simulated(stages: list[planning.Stage], budget: float) -> tuple[list[planning.Stage], float, float]:
    """(stand-in stages, simulated budget, simulated reserve): the plan compressed to SIMULATED_BUDGET."""
    factor = SIMULATED_BUDGET / budget
    fast = planning.compressed(stages, factor)
    reserve = planning.RESERVE * factor
    shares = planning.slices(fast, SIMULATED_BUDGET, reserve)
    fakes = []
    for stage in fast:
        seconds = 3600.0 if stage.key == HANGS else FAKE_SHARE * shares[stage.key]
        fakes.append(replace(stage, command=("{python}", "-m", "gpucheck.fake", stage.key, f"{seconds:.3f}",
                                             "{out}")))
    return fakes, SIMULATED_BUDGET, reserve

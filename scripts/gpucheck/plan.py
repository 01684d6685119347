"""gpu-check's stages, in the order of their value, and how a budget in seconds is split between them.

Every estimate below is a guess for one H100 or H200 with a cold Triton cache: nothing of fastkd has run on
a GPU yet. The budget (less a reserve for the last summary) is split in proportion to the estimates; the
runner (:mod:`gpucheck.runner`) lets a stage run to :data:`STRETCH` times its slice plus whatever the stages
before it saved, so a slow stage of more value takes its time from the last stages, never the other way.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace

DEFAULT_BUDGET = 540.0   # seconds: the device tool's 600 s per command, less a minute
RESERVE = 10.0           # seconds kept at the end for the last summary and the logs' archive
STRETCH = 2.0            # a stage may run to this many times its slice (plus the time saved before it)

TRITON_TEST_FILES = ("tests/test_crd_triton.py", "tests/test_logits_triton.py", "tests/test_similarity_triton.py",
                     "tests/test_iusp_triton.py", "tests/test_cosine_op.py", "tests/test_registered_ops.py")
BENCHMARKS = {  # stage key -> (file, what it measures)
    "bench-crd": ("benchmarks/test_crd.py",
                  "CRD step, B=256 K=16,384 N=1,281,167 D=128: published vs Triton vs CUDA C++"),
    "bench-engine": ("benchmarks/test_engine_step.py", "engine step resnet32x4 -> resnet8x4, batch 64: eager fp32 / "
                                                       "AMP bf16 / AMP + CUDA graph, KD-only vs CRD+KD"),
    "bench-logits": ("benchmarks/test_logits.py", "KD / DKD at 8,192 x 32,768: torch vs Triton"),
    "bench-similarity": ("benchmarks/test_similarity.py", "SP, CCKD, PKT, RKD, NST at b=256, IUSP at B=64 T=500: "
                                                          "torch vs Triton"),
    "bench-imagenet": ("benchmarks/test_imagenet_step.py", "ImageNet R34 -> R18 step, batch 256: KD-only vs CRD+KD"),
}


@dataclass(frozen=True)
class Stage:
    """One step of the check: a command run in the repository root, in a process group of its own."""

    key: str                       # a file-safe name: "tests-triton"
    title: str
    kind: str                      # "env", "tests", "build" or "bench"
    estimate: float                # seconds it should take (a guess; see the module)
    minimum: float                 # the least time worth starting it with
    command: tuple[str, ...]       # "{python}", "{out}" and "{work}" are filled in by the runner
    selection: tuple[str, ...] = ()  # pytest's arguments that choose the tests (tests/bench stages)
    background: bool = False       # started at the very beginning; its place in the list is where it is waited for


def _module_found(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def pytest_command(selection: tuple[str, ...], workers: int = 0, per_test_timeout: int = 0) -> tuple[str, ...]:
    """pytest over ``selection``, each test's outcome written as it ends (:mod:`gpucheck.report`)."""
    command = ("{python}", "-m", "pytest", *selection, "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
               "-p", "gpucheck.report")
    if workers > 1 and _module_found("xdist"):
        command += ("-n", str(workers))
    if per_test_timeout and _module_found("pytest_timeout"):
        command += (f"--timeout={per_test_timeout}",)
    return command


def bench_command(key: str, selection: tuple[str, ...]) -> tuple[str, ...]:
    return pytest_command(selection) + ("--benchmark-only", f"--benchmark-json={{work}}/{key}.json")


def stages(cpus: int | None = None) -> list[Stage]:
    """The real stages, for a machine with ``cpus`` cores (xdist workers for the test stages)."""
    cpus = cpus or os.cpu_count() or 1
    triton = TRITON_TEST_FILES
    cuda = ("-m", "cuda", "tests", *(f"--ignore={path}" for path in triton))
    found = [
        Stage("env", "environment: GPU, versions, copy bandwidth", "env", 20, 5,
              ("{python}", "-m", "gpucheck.environment", "{out}/env.json")),
        Stage("tests-triton", "Triton kernels against their references (every test of the Triton test files)",
              "tests", 90, 20, pytest_command(triton, workers=max(1, min(8, cpus // 2)), per_test_timeout=240),
              selection=triton),
        Stage("build", "fastkd._C with the CUDA sources (`python3 -m fastkd build`, MAX_JOBS=16)", "build", 30, 10,
              ("{python}", "-m", "fastkd", "build"), background=True),
        Stage("tests-cuda", "CUDA C++ CRD, CUDA-graph step, torch.compile on CUDA, every other `cuda` test",
              "tests", 90, 20, pytest_command(cuda, workers=max(1, min(4, cpus // 4)), per_test_timeout=240),
              selection=cuda),
    ]
    estimates = {"bench-crd": 45, "bench-engine": 60, "bench-logits": 45, "bench-similarity": 50,
                 "bench-imagenet": 40}
    minimums = {"bench-imagenet": 20}
    for key, (path, title) in BENCHMARKS.items():
        selection = (path, "-m", "cuda")
        found.append(Stage(key, title, "bench", estimates[key], minimums.get(key, 15), bench_command(key, selection),
                           selection=selection))
    return found


def only(plan: list[Stage], keys: str) -> list[Stage]:
    """The stages named in ``keys`` (comma-separated; empty: all), with the environment stage always."""
    wanted = {k.strip() for k in keys.split(",") if k.strip()}
    unknown = wanted - {s.key for s in plan}
    if unknown:
        raise ValueError(f"--only: no stage {', '.join(sorted(unknown))}; the stages: {', '.join(s.key for s in plan)}")
    return [s for s in plan if not wanted or s.key in wanted or s.kind == "env"]


def slices(plan: list[Stage], budget: float, reserve: float = RESERVE) -> dict[str, float]:
    """Each stage's share of ``budget`` less ``reserve``, in proportion to its estimate."""
    total = sum(stage.estimate for stage in plan)
    usable = max(budget - reserve, 0.0)
    return {stage.key: usable * stage.estimate / total for stage in plan}


def allowance(stage: Stage, left: float, planned: dict[str, float], remaining: list[Stage]) -> float:
    """Seconds ``stage`` may run when ``left`` seconds remain (the reserve excluded) for it and ``remaining``
    (the stages after it): :data:`STRETCH` times its slice plus what earlier stages saved, never past ``left``."""
    ahead = sum(planned[s.key] for s in remaining) + planned[stage.key]
    saved = max(0.0, left - ahead)
    return max(0.0, min(left, STRETCH * planned[stage.key] + saved))


def compressed(plan: list[Stage], factor: float) -> list[Stage]:
    """The plan with every duration multiplied by ``factor`` (the dry run's fast simulation)."""
    return [replace(s, estimate=s.estimate * factor, minimum=s.minimum * factor) for s in plan]

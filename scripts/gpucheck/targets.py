"""The targets of issues 3-6, each evaluated from gpu-check's test and benchmark records.

A record is one line of :mod:`gpucheck.report` (nodeid, outcome, params, and for a benchmark its median
seconds and ``extra_info``). Every target gives a row: what it asks, what was measured, met or not, or why
it was not measured ("not run: ..."). Rows marked ``info`` are figures the issues ask for without a target of
their own (the CUDA C++ kernels beside Triton, DKD, PKT, RKD, NST, the other engine modes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MIB = 1024 * 1024


class Records:
    """Test and benchmark records of one run, with the stage results that explain missing ones."""

    def __init__(self, records: list[dict], stages: dict[str, dict], env: dict):
        self.records, self.stages, self.env = records, stages, env

    def cases(self, path: str, func: str, **params) -> list[dict]:
        """Records of ``path::func[...]`` whose parameters include ``params``."""
        found = []
        for record in self.records:
            file, _, name = record["nodeid"].partition("::")
            if file == path and name.split("[")[0] == func and \
                    all(record.get("params", {}).get(k) == v for k, v in params.items()):
                found.append(record)
        return found

    def bench(self, path: str, func: str, **params) -> dict | None:
        """The benchmark numbers of the one case that matches (``None`` when it did not run)."""
        for record in self.cases(path, func, **params):
            if record.get("outcome") == "passed" and record.get("benchmark"):
                return record["benchmark"]
        return None

    def why_missing(self, stage: str, path: str, func: str, **params) -> str:
        """Why a case has no numbers: its failure, its skip, or its stage's fate."""
        for record in self.cases(path, func, **params):
            if record.get("outcome") in ("failed", "error", "skipped"):
                return f"{record['outcome']}: {record['nodeid'].split('::')[-1]}: {record.get('message', '')}"
        result = self.stages.get(stage, {})
        status = result.get("status", "not run")
        if status == "ok":
            return "not measured (the case did not run)"
        return result.get("reason") or status

    def copy_bandwidth(self, bench: dict | None) -> float | None:
        """The device-to-device copy bandwidth (bytes/s, read + write): the environment stage's, else the bench's."""
        found = self.env.get("copy_bytes_per_s")
        if not found and bench:
            found = bench.get("extra_info", {}).get("copy_bytes_per_s")
        return found


@dataclass(frozen=True)
class Target:
    """One row: ``measure(records)`` → (value, text shown) or a string saying why there is no value; ``met``
    decides a value (``None`` for a target that cannot be measured here, and for an ``info`` row)."""

    issue: int
    text: str
    measure: Callable[[Records], tuple[float, str] | str]
    met: Callable[[float], bool] | None
    info: bool = False   # a figure without a target of its own


def _ratio(stage: str, path: str, func: str, over: dict, under: dict, field: str = "median",
           fmt: str = "{:.2f}×") -> Callable[[Records], tuple[float, str] | str]:
    """over[field] / under[field] between two cases of one benchmark."""
    def measure(r: Records):
        a, b = r.bench(path, func, **over), r.bench(path, func, **under)
        if a is None or b is None:
            missing = over if a is None else under
            return r.why_missing(stage, path, func, **missing)
        num, den = _field(a, field), _field(b, field)
        if num is None or den is None or den == 0:
            return f"{field} not recorded"
        value = num / den
        return value, fmt.format(value) + f" ({_show(field, num)} / {_show(field, den)})"

    return measure


def _field(bench: dict, field: str) -> float | None:
    return bench.get(field) if field in bench else bench.get("extra_info", {}).get(field)


def _show(field: str, value: float) -> str:
    if field == "median":
        return f"{value * 1e3:.4g} ms"
    if field.endswith("bytes"):
        return f"{value / MIB:.4g} MiB"
    if field.endswith("_per_s"):
        return f"{value / 1e9:.4g} GB/s"
    return f"{value:.4g}"


def _gather(provider: str) -> Callable[[Records], tuple[float, str] | str]:
    def measure(r: Records):
        path, func = "benchmarks/test_crd.py", "test_crd_step_gpu"
        bench = r.bench(path, func, provider=provider)
        if bench is None:
            return r.why_missing("bench-crd", path, func, provider=provider)
        copy, got = r.copy_bandwidth(bench), bench.get("extra_info", {}).get("gather_bytes_per_s")
        if not copy or not got:
            return "gather or copy bandwidth not recorded"
        return got / copy, f"{got / copy:.0%} ({got / 1e12:.2f} of {copy / 1e12:.2f} TB/s)"

    return measure


def _tests(files: tuple[str, ...]) -> Callable[[Records], tuple[float, str] | str]:
    """Passes when every test of ``files`` that ran passed and none was skipped; value = failures + skips."""
    def measure(r: Records):
        mine = [x for x in r.records if x["nodeid"].split("::")[0] in files]
        if not mine:
            stages = [r.stages.get(k, {}) for k in ("tests-triton", "tests-cuda")]
            reasons = [s.get("reason") or s.get("status", "") for s in stages if s.get("status") != "ok"]
            return "; ".join(filter(None, reasons)) or "no test of these files ran"
        count = {o: sum(x["outcome"] == o for x in mine) for o in ("passed", "failed", "error", "skipped")}
        text = ", ".join(f"{n} {o}" for o, n in count.items() if n)
        skips = [x.get("message", "") for x in mine if x["outcome"] == "skipped"]
        if skips:  # on a GPU nothing here should skip: say why the first one did
            text += f" (first skip: {skips[0]})"
        return float(count["failed"] + count["error"] + count["skipped"]), text

    return measure


def _not_run(why: str) -> Callable[[Records], str]:
    return lambda r: why


CRD, ENGINE = "benchmarks/test_crd.py", "benchmarks/test_engine_step.py"
LOGITS, SIMILARITY, IMAGENET = "benchmarks/test_logits.py", "benchmarks/test_similarity.py", \
    "benchmarks/test_imagenet_step.py"
CPU = "not run: a CPU target, measured on the build machine (benchmarks/results/README.md)"


def _crd_rows(provider: str, name: str, info: bool) -> list[Target]:
    """Speed, memory and gather rows of one CRD provider: issue 3's targets for Triton, figures for CUDA C++."""
    at = lambda p: {"provider": p}  # noqa: E731
    texts = (f"CRD step: {name}'s speed-up over the published code (no target)",
             f"CRD step: {name}'s peak extra memory / the published code's (no target)",
             f"CRD step: {name}'s gather / the measured copy bandwidth (no target)") if info else \
        (f"CRD step at B=256, K=16,384, N=1,281,167, D=128: {name} ≥ 8× faster than the published code",
         f"CRD step: {name}'s peak extra memory ≤ 1/100 of the published code's",
         f"CRD step: {name}'s gather ≥ 70% of the measured copy bandwidth")
    return [
        Target(3, texts[0], _ratio("bench-crd", CRD, "test_crd_step_gpu", at("published"), at(provider)),
               None if info else (lambda v: v >= 8), info),
        Target(3, texts[1], _ratio("bench-crd", CRD, "test_crd_step_gpu", at(provider), at("published"),
                                   "peak_extra_bytes", "{:.4f}"),
               None if info else (lambda v: v <= 0.01), info),
        Target(3, texts[2], _gather(provider), None if info else (lambda v: v >= 0.70), info),
    ]


def _speed_and_memory(issue: int, stage: str, path: str, func: str, label: str, case: dict, provider_key: str,
                      fast: str, times: float | None, memory: bool) -> list[Target]:
    ref, new = dict(case, **{provider_key: "torch"}), dict(case, **{provider_key: fast})
    speed = f"{label}: Triton ≥ {times:g}× the reference (full step)" if times else \
        f"{label}: Triton vs the reference, full step (no target)"
    rows = [Target(issue, speed, _ratio(stage, path, func, ref, new), (lambda v, t=times: v >= t) if times else None,
                   not times)]
    mem = f"{label}: peak extra memory ≤ 1/2 of the reference's" if memory else \
        f"{label}: peak extra memory, Triton / reference (no target)"
    rows.append(Target(issue, mem, _ratio(stage, path, func, new, ref, "peak_extra_bytes", "{:.3f}"),
                       (lambda v: v <= 0.5) if memory else None, not memory))
    return rows


def targets() -> list[Target]:
    """Every target of issues 3-6, in issue order, with the info rows beside the targets they explain."""
    rows = _crd_rows("triton", "Triton", info=False) + _crd_rows("native", "CUDA C++", info=True)
    rows += [
        Target(3, "CRD GPU tests pass: Triton kernels, CUDA C++ kernels, whole step in a CUDA graph",
               _tests(("tests/test_crd_triton.py", "tests/test_crd_cuda.py", "tests/test_crd.py")),
               lambda v: v == 0),
        Target(3, "torch.compile (inductor) on CUDA tensors: fastkd's ops trace without graph breaks, eager's numbers",
               _tests(("tests/test_compile_cuda.py",)), lambda v: v == 0),
        Target(3, "CPU: native ≥ 10× faster, ≤ 1/20 of the peak extra memory (B=64, N=50,000)", _not_run(CPU),
               None),
    ]
    mode = lambda losses, m: {"losses": losses, "mode": m}  # noqa: E731
    engine = "test_engine_step_gpu"
    rows += [
        Target(4, "engine step resnet32x4 → resnet8x4, batch 64, CRD+KD: AMP + CUDA graph ≥ 2× eager fp32",
               _ratio("bench-engine", ENGINE, engine, mode("crd_kd", "eager_fp32"), mode("crd_kd", "amp_graph")),
               lambda v: v >= 2),
        Target(4, "engine step, KD-only: AMP + CUDA graph vs eager fp32 (no target)",
               _ratio("bench-engine", ENGINE, engine, mode("kd", "eager_fp32"), mode("kd", "amp_graph")),
               None, True),
        Target(4, "engine step, CRD+KD: AMP alone vs eager fp32 (no target)",
               _ratio("bench-engine", ENGINE, engine, mode("crd_kd", "eager_fp32"), mode("crd_kd", "amp")),
               None, True),
    ]
    for m, label, is_target in (("amp_graph", "AMP + CUDA graph", True), ("amp", "AMP", False),
                                ("eager_fp32", "eager fp32", False)):
        text = f"engine step ({label}): CRD+KD ≤ 1.15× the KD-only step" if is_target else \
            f"engine step ({label}): CRD+KD / KD-only (no target)"
        rows.append(Target(4, text, _ratio("bench-engine", ENGINE, engine, mode("crd_kd", m), mode("kd", m)),
                           (lambda v: v <= 1.15) if is_target else None, not is_target))
    rows.append(Target(4, "the CUDA-graph + AMP step matches the eager step (tests/test_graph.py)",
                       _tests(("tests/test_graph.py",)), lambda v: v == 0))
    logits = dict(phase="full")
    rows += _speed_and_memory(5, "bench-logits", LOGITS, "test_logits_gpu", "KD at 8,192 × 32,768",
                              dict(logits, loss="kd"), "provider", "triton", 2, True)
    rows += _speed_and_memory(5, "bench-logits", LOGITS, "test_logits_gpu", "DKD at 8,192 × 32,768",
                              dict(logits, loss="dkd"), "provider", "triton", None, False)
    for loss, label, times in (("sp", "SP at b=256, C·H·W=16,384", 1.5), ("cckd", "CCKD at b=256, D=16,384", 1.5),
                               ("pkt", "PKT at b=256", None), ("rkd_distance", "RKD distance at b=256", None),
                               ("rkd_angle", "RKD angle at b=256", None), ("nst", "NST at b=256", None)):
        rows += _speed_and_memory(5, "bench-similarity", SIMILARITY, "test_similarity_gpu", label,
                                  dict(loss=loss, mode="full"), "provider", "triton", times, times is not None)
    rows += [
        Target(5, "GPU tests of the logit and relation ops pass (fp32 / fp16 / bf16)",
               _tests(("tests/test_logits_triton.py", "tests/test_similarity_triton.py", "tests/test_cosine_op.py")),
               lambda v: v == 0),
        Target(5, "CPU: native ≥ 3× the reference for each loss at b=64", _not_run(CPU), None),
        Target(6, "ImageNet step R34 → R18, batch 256, 224², bf16: CRD+KD ≤ 1.1× the KD-only step",
               _ratio("bench-imagenet", IMAGENET, "test_imagenet_step_gpu", {"setting": "crd_kd"},
                      {"setting": "kd"}), lambda v: v <= 1.1),
        Target(6, "bank synchronisation traffic ≤ 2·G·(D+1)·4 bytes per rank per step",
               _not_run("not run: needs two or more GPUs with NCCL (one is lent); the written model "
                        "(benchmarks/results/distributed-scaling.md) gives (W−1)/W of that"), None),
    ]
    return rows


def evaluate(records: Records) -> list[dict]:
    """One dict per row: issue, target, measured (text), value, met (True / False / None), info."""
    rows = []
    for target in targets():
        try:
            got = target.measure(records)
        except Exception as exc:  # noqa: BLE001 (a record of an unexpected shape spoils one row, not the summary)
            got = f"not evaluated: {type(exc).__name__}: {exc}"
        row = {"issue": target.issue, "target": target.text, "info": target.info}
        if isinstance(got, str):
            row.update(measured=got, value=None, met=None)
        else:
            value, text = got
            met = None if target.met is None else bool(target.met(value))
            row.update(measured=text, value=round(value, 6), met=met)
        rows.append(row)
    return rows

"""gpu-check (scripts/gpucheck, ``bash scripts/dev gpu-check``): the budget split, the time limits, the partial
results a cut or stopped run leaves, the summary and its targets, the out folder's limits, the per-test
records, and that every GPU test and benchmark of the project is in some stage. Runs without a GPU."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpucheck import outfolder, plan, summary, targets  # noqa: E402
from gpucheck.runner import Runner, rounds_fraction  # noqa: E402

ENV = dict(os.environ, FASTKD_PYTHON=sys.executable, PYTHONPATH=str(ROOT / "scripts"))


def stage(key, estimate, minimum=0.1, kind="tests", command=("{python}", "-c", "pass"), background=False):
    return plan.Stage(key, key, kind, estimate, minimum, command, background=background)


def statuses(out: Path) -> dict[str, str]:
    return {s["key"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}


# --- the plan and the budget ------------------------------------------------------------------------

def test_the_default_budget_gives_every_stage_its_estimate():
    stages = plan.stages(cpus=16)
    shares = plan.slices(stages, plan.DEFAULT_BUDGET)
    assert sum(shares.values()) == pytest.approx(plan.DEFAULT_BUDGET - plan.RESERVE)
    for s in stages:
        assert shares[s.key] >= s.estimate > s.minimum, s.key  # full rounds at 540 s, if the estimates hold
    assert [s.key for s in stages][:4] == ["env", "tests-triton", "build", "tests-cuda"]  # the order of value
    assert [s.key for s in stages if s.background] == ["build"]
    halved = plan.slices(stages, 270)
    assert halved["bench-crd"] == pytest.approx(shares["bench-crd"] * 260 / 530)


def test_only_keeps_the_named_stages_and_the_environment():
    stages = plan.stages(cpus=16)
    assert [s.key for s in plan.only(stages, "bench-crd, tests-cuda")] == ["env", "tests-cuda", "bench-crd"]
    assert plan.only(stages, "") == stages
    with pytest.raises(ValueError, match="no stage bench-gpu; the stages: env, tests-triton"):
        plan.only(stages, "bench-gpu")


def test_allowance_stretches_takes_saved_time_and_never_passes_what_is_left():
    a, b, c = stage("a", 10), stage("b", 20), stage("c", 30)
    shares = plan.slices([a, b, c], 70, reserve=10)  # 10, 20, 30
    assert plan.allowance(a, 60, shares, [b, c]) == pytest.approx(20)        # on schedule: twice its slice
    assert plan.allowance(b, 60, shares, [c]) == pytest.approx(40 + 10)      # 10 s saved by a
    assert plan.allowance(b, 35, shares, [c]) == pytest.approx(35)           # behind: what is left, at most
    assert plan.allowance(c, 12, shares, []) == pytest.approx(12)
    assert plan.allowance(c, -3, shares, []) == 0


def test_benchmark_rounds_shrink_with_the_allowance():
    assert rounds_fraction(60, 45) == 1.0
    assert rounds_fraction(27, 45) == pytest.approx(0.6)
    assert rounds_fraction(2, 45) == 0.25


# --- the runner -------------------------------------------------------------------------------------

def run_stages(tmp_path, stages, budget, reserve=0.2):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    publisher = outfolder.Publisher(out, work, budget, dry_run=True)
    runner = Runner(stages, plan.slices(stages, budget, reserve), budget, reserve, ROOT, out, work, publisher,
                    grace=0.3, say=lambda line: None, base_env=ENV)
    return runner.run(), out, work


def test_each_stage_sees_the_summary_of_the_stages_before_it(tmp_path):
    """The summary is rewritten when a stage starts and ends: a stage reads it while it runs."""
    check = ("import json, sys; s = {x['key']: x['status'] for x in json.load(open(sys.argv[1]))['stages']}; "
             "sys.exit(0 if s == {'first': 'ok', 'second': 'running', 'third': 'pending'} else 3)")
    stages = [stage("first", 1), stage("second", 1, command=("{python}", "-c", check, "{out}/summary.json")),
              stage("third", 1)]
    results, out, _ = run_stages(tmp_path, stages, budget=6)
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    assert json.loads((out / "summary.json").read_text())["final"] is True


def test_no_gpu_skips_the_rest_and_stops_the_background_stage(tmp_path):
    env = ("import json, sys; json.dump({'cuda_available': False, 'torch': 'x'}, open(sys.argv[1], 'w'))")
    stages = [stage("build", 1, kind="build", command=("{python}", "-c", "import time; time.sleep(30)"),
                    background=True),
              stage("env", 1, kind="env", command=("{python}", "-c", env, "{out}/env.json")),
              stage("tests", 1)]
    start = time.monotonic()
    results, out, _ = run_stages(tmp_path, [stages[1], stages[0], stages[2]], budget=20)
    assert time.monotonic() - start < 5  # the background stage was stopped, not waited for
    found = {r.key: (r.status, r.reason) for r in results}
    assert found["env"] == ("ok", "")
    assert found["build"][0] == "cut" and found["tests"][0] == "not run"
    assert "no CUDA device" in found["tests"][1]


def test_the_dry_run_cuts_a_hanging_stage_and_skips_what_no_longer_fits(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "dev"), "gpu-check", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    shares = plan.slices(plan.stages(), plan.DEFAULT_BUDGET)
    for key, share in shares.items():  # the plan: every stage with the time it is given
        assert any(line.split()[1:2] == [key] and f"{share:.0f}s" in line for line in done.stdout.splitlines()), key
    assert statuses(out) == {"env": "ok", "tests-triton": "failed", "build": "ok", "tests-cuda": "ok",
                             "bench-crd": "ok", "bench-engine": "ok", "bench-logits": "ok",
                             "bench-similarity": "cut", "bench-imagenet": "not run"}
    rep = json.loads((out / "summary.json").read_text())
    by_key = {s["key"]: s for s in rep["stages"]}
    assert by_key["bench-similarity"]["reason"].startswith("cut by the time limit")
    assert by_key["bench-imagenet"]["reason"].startswith("not run: budget")
    assert rep["elapsed_s"] <= rep["budget_s"] + 1
    rows = {t["target"]: t for t in rep["targets"]}
    crd = "CRD step at B=256, K=16,384, N=1,281,167, D=128: Triton ≥ 8× faster than the published code"
    assert rows[crd]["met"] is True and rows[crd]["value"] == pytest.approx(12.0)
    assert rows["CRD step: Triton's gather ≥ 70% of the measured copy bandwidth"]["met"] is False
    sp = rows["SP at b=256, C·H·W=16,384: Triton ≥ 1.5× the reference (full step)"]
    assert sp["met"] is True  # measured before the stage was cut
    cckd = rows["CCKD at b=256, D=16,384: Triton ≥ 1.5× the reference (full step)"]
    assert cckd["met"] is None and cckd["measured"].startswith("cut by the time limit")
    imagenet = [t for t in rep["targets"] if t["issue"] == 6 and not t["info"]][0]
    assert imagenet["met"] is None and imagenet["measured"].startswith("not run: budget")
    assert {t["issue"] for t in rep["targets"]} == {3, 4, 5, 6}
    bank = [t for t in rep["targets"] if t["target"].startswith("bank synchronisation")][0]
    assert not bank["info"] and bank["met"] is None and bank["measured"].startswith("not run: needs two or more GPUs")
    assert rep["failures"] == [{"nodeid": "tests/test_similarity_triton.py::test_gpu_sizes[sp_loss-torch.bfloat16]",
                                "outcome": "failed", "message": "AssertionError: relative error 2.1e-02 > 1e-02 "
                                                                "(simulated)"}]
    assert rep["log_tails"]["bench-similarity"][-1] == "fake bench-similarity: wrote 2 records, sleeping 3600.00 s"
    assert set(rep["log_tails"]) == {"tests-triton", "bench-similarity"}  # the stages that failed or were cut
    text = (out / "summary.md").read_text()
    assert "DRY RUN" in text and "| **cut** |" in text and "not run: budget" in text
    tail = done.stdout[-12000:]  # what the device tool returns of the output: the digest, all of it
    assert "gpu-check summary (DRY RUN" in tail and "  bench-similarity: cut" in tail
    assert "  3: NO | 57% (1.70 of 3.00 TB/s) | CRD step: Triton's gather" in tail
    assert tail.count("\n  ") >= len(shares) + len(rep["targets"])
    assert sorted(p.name for p in out.iterdir()) == sorted(outfolder.FILES)
    assert outfolder.problems(out) == []
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {f"logs/{key}.log" for key in shares if key != "bench-imagenet"} <= set(names)
    assert "logs/bench-similarity.jsonl" in names


def test_a_stopped_gpu_check_leaves_a_summary(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gpucheck", "--dry-run", "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if statuses(out).get("tests-triton") == "running":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 1
    rep = json.loads((out / "summary.json").read_text())
    found = {s["key"]: (s["status"], s["reason"]) for s in rep["stages"]}
    assert found["env"][0] == "ok"
    assert found["tests-triton"] == ("cut", "stopped: gpu-check received a signal")
    assert found["bench-imagenet"] == ("not run", "stopped: gpu-check received a signal")
    assert rep["final"] and (out / "summary.md").is_file() and (out / "logs.tar.gz").is_file()


def test_scripts_dev_gpu_check_sets_up_nothing(tmp_path):
    """gpu-check runs on the device machine's own python3: no virtual environment, no install."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(["bash", "scripts/dev", "gpu-check", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(ENV, PATH=os.environ["PATH"]), timeout=60)
    assert done.returncode == 0 and "--budget" in done.stdout, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scripts"]


# --- records, targets, the out folder ---------------------------------------------------------------

PLUGIN_TESTS = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup went wrong")

def test_passes():
    pass

@pytest.mark.parametrize("size", [3, 4])
def test_fails(size):
    assert size == 3, "size is not 3\\nsecond line"

def test_skips():
    pytest.skip("no GPU here")

@pytest.mark.skip(reason="marked")
@pytest.mark.parametrize("n", [7])
def test_marked(n):
    pass

def test_setup_error(broken):
    pass

def test_benchmark(benchmark):
    benchmark.pedantic(lambda: sum(range(100)), rounds=3, warmup_rounds=0)
    benchmark.extra_info["peak_extra_bytes"] = 1234
'''


def test_the_report_plugin_writes_a_record_per_test(tmp_path):
    (tmp_path / "test_sample.py").write_text(PLUGIN_TESTS)
    records = tmp_path / "records.jsonl"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpucheck.report", "-p", "no:cacheprovider",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True, timeout=60,
                   env=dict(ENV, GPUCHECK_RECORDS=str(records), GPUCHECK_STAGE="demo"))
    got = {r["nodeid"].split("::")[1]: r for r in map(json.loads, records.read_text().splitlines())}
    assert {k: r["outcome"] for k, r in got.items()} == {
        "test_passes": "passed", "test_fails[3]": "passed", "test_fails[4]": "failed", "test_skips": "skipped",
        "test_setup_error": "error", "test_benchmark": "passed", "test_marked[7]": "skipped"}
    assert got["test_fails[4]"]["message"] == "AssertionError: size is not 3"
    assert got["test_fails[4]"]["params"] == {"size": 4} and got["test_passes"]["stage"] == "demo"
    assert got["test_skips"]["message"] == "Skipped: no GPU here"
    assert got["test_marked[7]"]["params"] == {"n": 7} and got["test_marked[7]"]["message"] == "Skipped: marked"
    assert "setup went wrong" in got["test_setup_error"]["message"]
    bench = got["test_benchmark"]["benchmark"]
    assert bench["rounds"] == 3 and bench["median"] > 0 and bench["extra_info"] == {"peak_extra_bytes": 1234}


def test_a_skipped_or_failed_case_says_why_its_target_was_not_measured():
    crd = "benchmarks/test_crd.py::test_crd_step_gpu"
    records = [
        {"nodeid": f"{crd}[published]", "outcome": "passed", "params": {"provider": "published"},
         "benchmark": {"median": 0.1, "extra_info": {"peak_extra_bytes": 100.0}}},
        {"nodeid": f"{crd}[native]", "outcome": "skipped", "params": {"provider": "native"},
         "message": "Skipped: backend native is not available"},
        {"nodeid": f"{crd}[triton]", "outcome": "failed", "params": {"provider": "triton"},
         "message": "RuntimeError: out of resources"},
    ]
    rows = {t["target"]: t for t in targets.evaluate(targets.Records(records, {"bench-crd": {"status": "failed"}}, {}))}
    triton = rows["CRD step at B=256, K=16,384, N=1,281,167, D=128: Triton ≥ 8× faster than the published code"]
    native = rows["CRD step: CUDA C++'s speed-up over the published code (no target)"]
    assert triton["met"] is None
    assert triton["measured"] == "failed: test_crd_step_gpu[triton]: RuntimeError: out of resources"
    assert native["measured"].startswith("skipped:") and native["info"]
    engine = [t for t in rows.values() if t["issue"] == 4 and not t["info"]][0]
    assert engine["measured"] == "not run"  # its stage has no result yet


def test_summary_counts_a_test_once_and_lists_benchmarks():
    records = [{"nodeid": "t.py::a", "outcome": "failed", "stage": "s", "message": "boom"},
               {"nodeid": "t.py::a", "outcome": "error", "stage": "s", "message": "teardown"},
               {"nodeid": "t.py::b", "outcome": "passed", "stage": "s",
                "benchmark": {"median": 0.002, "min": 0.001, "rounds": 5, "extra_info": {"images_per_s": 10.0}}}]
    merged = summary.merge(records)
    assert summary.counts(merged, "s") == {"error": 1, "passed": 1}
    assert summary.bench_rows(merged) == [{"case": "t.py::b", "median_ms": 2.0, "min_ms": 1.0, "rounds": 5,
                                           "images_per_s": 10.0}]


def test_out_folder_problems_name_what_would_not_come_back(tmp_path, monkeypatch):
    for n in range(9):
        (tmp_path / f"f{n}.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    monkeypatch.setattr(outfolder, "MAX_BYTES", 1)
    (tmp_path / "f0.txt").write_text("xx")
    found = outfolder.problems(tmp_path)
    assert any("11 files, more than 8" in p for p in found)
    assert any(p.startswith("a/b/c/deep.txt: deeper") for p in found)
    assert any(p.startswith("bad name.txt: a name") for p in found)
    assert any(p.startswith("f0.txt: over") for p in found)


# --- every GPU test and benchmark is in a stage -----------------------------------------------------

COLLECT = '''
import json, sys
import pytest

class Ids:
    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

found = {}
for name, args in json.loads(sys.argv[1]).items():
    ids = Ids()
    pytest.main([*args, "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[ids])
    found[name] = ids.ids
print("IDS" + json.dumps(found))
'''


def test_every_gpu_test_and_benchmark_is_in_some_stage():
    """Collect the `cuda`-marked tests of tests/ and benchmarks/, and what each stage's pytest selection collects:
    the stages together hold every one (tests/ and benchmarks/ are collected apart: both have a test_crd.py)."""
    stages = plan.stages(cpus=16)
    groups = {"tests": {"all cuda": ["-m", "cuda", "tests"]}, "benchmarks": {"all cuda": ["-m", "cuda", "benchmarks"]}}
    for s in stages:
        if s.selection:
            groups["benchmarks" if s.kind == "bench" else "tests"][s.key] = list(s.selection)
    procs = {g: subprocess.Popen([sys.executable, "-c", COLLECT, json.dumps(sel)], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True,
                                 env=dict(os.environ, FASTKD_BUILD_NATIVE="0", FASTKD_REQUIRE_NATIVE="0"))
             for g, sel in groups.items()}
    collected = {}
    for group, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        collected.update({(group, k): set(v) for k, v in json.loads(out.split("IDS", 1)[1]).items()})
    for group, floor in (("tests", 200), ("benchmarks", 50)):
        wanted = collected[(group, "all cuda")]
        assert len(wanted) >= floor
        covered = set().union(*(ids for (g, k), ids in collected.items() if g == group and k != "all cuda"))
        assert wanted <= covered, sorted(wanted - covered)[:10]
    for (group, key), ids in collected.items():
        assert ids, f"stage {key} selects no test"
    assert any("test_compile_cuda.py" in i for i in collected[("tests", "tests-cuda")])
    assert any("test_graph.py" in i for i in collected[("tests", "tests-cuda")])
    assert not collected[("tests", "tests-cuda")] & collected[("tests", "tests-triton")]  # nothing runs twice

"""The native library's loading and build (fastkd/_native): build tags, the cache's lock, the messages.

Subprocesses import a copy of the package (fastkd/ and csrc/, with no built library unless a test
puts one there) and get a build cache of their own, so each starts from a known state. None of
them compiles: tests/test_install.py compiles, in a fresh environment.
"""
import importlib.machinery
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastkd import _native
from fastkd._native import cache, jit
from fastkd._native.plan import read_tag
from fastkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
WHY = "fastkd: the native kernels are not available"
PROBE = """
import torch, fastkd
from fastkd import _native
from fastkd.backends import choose
from fastkd.ops.logits import kd_reference
s, t = torch.randn(6, 50), torch.randn(6, 50)
print('native' in fastkd.backends(), choose('kd_loss', 'cpu'), choose('crd_bank_update', 'cpu'), _native.path())
print(float(fastkd.KDLoss()(s, t)), float(kd_reference(s, t, 4.0)))
crd = fastkd.CRDLoss(8, 8, 50, feat_dim=4, num_negatives=5)
print(float(crd(torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 1, 2])).detach()))
"""


def package_copy(where: Path, library: bytes | None = None) -> Path:
    """fastkd/ and csrc/ copied into ``where``; ``library`` (bytes) becomes the package's fastkd/_C*.so."""
    shutil.copytree(ROOT / "fastkd", where / "fastkd", ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "csrc"))
    shutil.copytree(ROOT / "csrc", where / "csrc")
    if library is not None:
        (where / "fastkd" / LIBRARY).write_bytes(library)
    return where


def run(code: str, package: Path, cache_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` on the package copy, with the build cache ``cache_dir`` and ``env`` (no other FASTKD_*)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FASTKD_")}
    base.update(PYTHONPATH=str(package), FASTKD_CACHE=str(cache_dir), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=package, env=base, capture_output=True, text=True,
                          timeout=300)


def probe_lines(out: subprocess.CompletedProcess) -> tuple[str, float, float]:
    assert out.returncode == 0, out.stderr
    first, values, _ = out.stdout.splitlines()
    kd, reference = map(float, values.split())
    return first, kd, reference


def fake_library(tag: str | None) -> bytes:
    """Bytes that are no library at all: the loader must decide from the tag alone, before loading."""
    return b"\x7fnot an ELF file\0" + (tag.encode() + b"\0" if tag else b"") + b"padding" * 10


def test_no_compiler_says_why_once_and_runs_on_torch(tmp_path):
    out = run(PROBE, package_copy(tmp_path / "pkg"), tmp_path / "cache", CXX="/nonexistent/c++")
    first, kd, reference = probe_lines(out)
    assert first == "False torch torch None"
    assert kd == pytest.approx(reference, rel=1e-6)
    assert out.stderr.count(WHY) == 1  # told once, though every op call asked
    assert "no C++ compiler was found (CXX=/nonexistent/c++ is not an executable)" in out.stderr
    assert "apt-get install g++" in out.stderr and "fastkd build" in out.stderr
    assert not (tmp_path / "cache").exists()  # nothing was attempted


def test_no_compiler_on_path(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out = run(PROBE, package_copy(tmp_path / "pkg"), tmp_path / "cache", PATH=str(empty), CXX="")
    probe_lines(out)
    assert "no C++ compiler was found (no `c++` on PATH)" in out.stderr


def test_missing_ninja_is_named(monkeypatch):
    monkeypatch.setattr(jit, "compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(jit, "ninja", lambda: None)
    with pytest.raises(jit.Unavailable, match="ninja, which torch compiles extensions with, was not found") as exc:
        jit.check_tools()
    assert "-m pip install ninja" in exc.value.fix


def test_require_native_turns_the_failure_into_an_error(tmp_path):
    out = run("import fastkd; fastkd.backends()", package_copy(tmp_path / "pkg"), tmp_path / "cache",
              CXX="/nonexistent/c++", FASTKD_REQUIRE_NATIVE="1")
    assert out.returncode != 0
    assert "RuntimeError: FASTKD_REQUIRE_NATIVE=1, but fastkd's native kernels are not available: no C++ compiler" \
        in out.stderr


def test_build_native_0_runs_on_torch_without_a_word(tmp_path):
    out = run(PROBE, package_copy(tmp_path / "pkg"), tmp_path / "cache", FASTKD_BUILD_NATIVE="0")
    assert probe_lines(out)[0] == "False torch torch None"
    assert out.stderr == ""


@pytest.mark.native
def test_the_loaded_library_carries_this_torchs_tag():
    tag = read_tag(_native.path())
    assert tag is not None and tag.startswith(f"fastkd-build:torch={torch.__version__};")
    assert _native.current_plan().mismatch(tag) is None


def test_the_plan_takes_the_cuda_sources_with_a_cuda_torch_and_toolkit(monkeypatch):
    from torch.utils import cpp_extension

    from fastkd._native.plan import parse_tag, plan_for

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    cuda = plan_for(ROOT / "csrc")
    assert {"crd.cu", "crd_binding.cpp"} <= {Path(p).name for p in cuda.sources}
    assert "-DFASTKD_WITH_CUDA" in cuda.cxx and "--use_fast_math" in cuda.nvcc
    assert parse_tag(cuda.tag)["variant"] == "cu12.8" and cuda.key.endswith(parse_tag(cuda.tag)["build"])
    monkeypatch.setenv("FASTKD_BUILD_CUDA", "0")
    cpu = plan_for(ROOT / "csrc")
    assert all(Path(p).parent.name != "cuda" for p in cpu.sources) and "-DFASTKD_WITH_CUDA" not in cpu.cxx
    assert parse_tag(cpu.tag)["variant"] == "cpu" and cpu.mismatch(cuda.tag) is None  # the variant is not compared


def seeded_cache(where: Path) -> Path:
    """A build cache holding this process's native library as the build for this torch; its library's path."""
    target = where / "native" / _native.current_plan().key / cache.LIBRARY
    target.parent.mkdir(parents=True)
    shutil.copyfile(_native.path(), target)
    return target


@pytest.mark.native
def test_a_library_built_for_another_torch_is_not_loaded(tmp_path):
    stale = "fastkd-build:torch=0.0.1;variant=cpu;python=cpython-311;build=0123456789abcdef"
    package = package_copy(tmp_path / "pkg", fake_library(stale))
    cached = seeded_cache(tmp_path / "cache")
    out = run(PROBE, package, tmp_path / "cache", CXX="/nonexistent/c++")
    first, kd, reference = probe_lines(out)
    assert first == f"True native native {cached}"
    assert kd == pytest.approx(reference, rel=1e-5)
    assert (f"fastkd: ignoring {package / 'fastkd' / LIBRARY}: it was built for torch 0.0.1, but torch "
            f"{torch.__version__} is installed; using {cached} instead") in out.stderr
    assert WHY not in out.stderr


@pytest.mark.parametrize("tag, why", [
    (None, "has no build tag (built by an older fastkd, or by CMake)"),
    ("fastkd-build:torch={torch};variant=cpu;python={python};build=0000000000000000", "other sources or flags"),
])
def test_a_stale_library_without_a_build_falls_back_loudly(tmp_path, tag, why):
    if tag:
        tag = tag.format(torch=torch.__version__, python=sys.implementation.cache_tag)
    out = run(PROBE, package_copy(tmp_path / "pkg", fake_library(tag)), tmp_path / "cache", CXX="/nonexistent/c++")
    assert probe_lines(out)[0] == "False torch torch None"
    assert why in out.stderr and "compiling the kernels into the cache instead" in out.stderr
    assert "no C++ compiler was found" in out.stderr


def test_a_library_that_does_not_load_is_reported(tmp_path):
    package = package_copy(tmp_path / "pkg", fake_library(_native.current_plan().tag))  # the right tag, no library
    out = run(PROBE, package, tmp_path / "cache")
    assert probe_lines(out)[0] == "False torch torch None"
    assert f"{package / 'fastkd' / LIBRARY} could not be loaded" in out.stderr
    assert "fastkd build --force" in out.stderr


@pytest.mark.skipif(jit.compiler() is None or jit.ninja() is None, reason="needs a C++ compiler and ninja")
def test_a_compile_error_is_shown_with_its_first_lines_and_remembered(tmp_path):
    package = package_copy(tmp_path / "pkg")
    header = package / "csrc" / "cpu" / "ops.h"
    header.write_text('#include "fastkd_missing_header.h"\n' + header.read_text())  # every file fails at once
    out = run(PROBE, package, tmp_path / "cache")
    assert probe_lines(out)[0] == "False torch torch None"
    assert out.stderr.count("fastkd: compiling the native kernels for torch") == 1
    assert out.stderr.count("fatal error: fastkd_missing_header.h: No such file or directory") == 1, out.stderr
    assert "failed; the first lines of " in out.stderr and "`fastkd build --force` retries" in out.stderr
    again = run(PROBE, package, tmp_path / "cache")  # remembered: told again without compiling again
    assert probe_lines(again)[0] == "False torch torch None"
    assert "fatal error: fastkd_missing_header.h" in again.stderr and "fastkd: compiling the native" not in again.stderr
    forced = run("from fastkd.cli import main; raise SystemExit(main(['build', '--force']))", package, tmp_path / "cache")
    assert forced.returncode == 1 and "fastkd: compiling the native kernels" in forced.stderr


# ---------------------------------------------------------------- the cache's lock

BUILDER = """
import os, sys, time
from pathlib import Path
from fastkd._native import cache
build, go = Path(sys.argv[1]), Path(sys.argv[2])
def make(temporary):
    print("making", flush=True)
    while not go.exists():
        time.sleep(0.05)
    (temporary / cache.LIBRARY).write_text(str(os.getpid()))
print("built by", cache.build_once(build, make, waiting=lambda: print("waiting", flush=True)).read_text())
"""


def start_builder(build: Path, go: Path) -> subprocess.Popen:
    env = {**os.environ, "FASTKD_BUILD_NATIVE": "0"}
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(build), str(go)], stdout=subprocess.PIPE, text=True,
                            env=env)


def test_two_processes_build_once_and_share_the_build(tmp_path):
    build, go = tmp_path / "native" / "key", tmp_path / "go"
    first, second = start_builder(build, go), start_builder(build, go)
    lines = {p.pid: p.stdout.readline().strip() for p in (first, second)}  # each: "making" or "waiting"
    assert sorted(lines.values()) == ["making", "waiting"]
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in (first, second)]
    builder = next(pid for pid, line in lines.items() if line == "making")
    assert outs == [f"built by {builder}"] * 2
    assert sorted(p.name for p in build.parent.iterdir()) == ["key", "key.lock"]


def test_a_killed_builder_blocks_nobody(tmp_path):
    build, go = tmp_path / "native" / "key", tmp_path / "go"
    killed = start_builder(build, go)
    assert killed.stdout.readline().strip() == "making"
    assert list(build.parent.glob(".key.tmp-*"))  # its half-made build
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    go.touch()
    start = time.perf_counter()
    next_one = start_builder(build, go)
    out = next_one.communicate(timeout=60)[0].split()
    assert out[0] == "making" and out[-1] == str(next_one.pid) and time.perf_counter() - start < 30
    assert sorted(p.name for p in build.parent.iterdir()) == ["key", "key.lock"]  # the leftover is gone


def test_a_failed_build_is_remembered_until_forced(tmp_path):
    build, calls = tmp_path / "native" / "key", []

    def failing(temporary):
        calls.append("fail")
        raise cache.Failed("x.cpp:1:1: error: boom\n", temporary / "build.log")

    with pytest.raises(cache.Failed) as exc:
        cache.build_once(build, failing)
    assert exc.value.log_path == cache.failed_log(build) and "error: boom" in cache.failed_log(build).read_text()
    with pytest.raises(cache.Failed):
        cache.build_once(build, failing)
    assert calls == ["fail"]  # not tried again
    assert cache.build_once(build, lambda t: (t / cache.LIBRARY).write_text("ok"), force=True).read_text() == "ok"
    assert not cache.failed_log(build).exists()
    assert jit.first_errors(exc.value.log) == ["x.cpp:1:1: error: boom"]


# ---------------------------------------------------------------- the commands


@pytest.mark.native
def test_build_and_doctor_report_the_loaded_library(capsys):
    assert main(["build"]) == 0
    assert str(_native.path()) in capsys.readouterr().out
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"loaded from {_native.path()}" in out and "missing" not in out
    row = next(line for line in out.splitlines() if line.startswith("kd_loss "))
    assert row.split()[1:4] == ["native", "(torch,", "native)"]


def test_doctor_fails_when_the_build_is_missing(tmp_path):
    out = run("from fastkd.cli import main; raise SystemExit(main(['doctor']))", package_copy(tmp_path / "pkg"),
              tmp_path / "cache")
    assert out.returncode == 1, out.stderr
    assert "not built yet for torch" in out.stdout and "- Compile the native kernels now: `fastkd build`" in out.stdout
    assert out.stderr == ""  # the doctor compiles nothing


def test_cuda_architectures_are_named_when_no_gpu_can_be_asked(monkeypatch):
    """A CUDA torch on a machine without a GPU: torch derives the architectures from the visible GPUs and,
    finding none, fails inside cpp_extension with an IndexError; the build names them instead."""
    from fastkd._native import plan

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan.cuda_arch_env(True) == {"TORCH_CUDA_ARCH_LIST": plan.DEFAULT_CUDA_ARCHS}
    assert plan.cuda_arch_env(False) == {}  # a CPU build needs none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert plan.cuda_arch_env(True) == {}  # torch asks the GPU
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan.cuda_arch_env(True) == {}  # the user's list stands

"""Installing fastkd as a user does: the sdist's contents, and a plain ``pip install .`` in a fresh environment.

The install test (marker ``install``, a few minutes: CI runs it) builds with pip's defaults (an
isolated build, which cannot see torch: a pure-Python wheel carrying the C++ sources), then starts
two processes at once that both need the native kernels: one compiles them into a fresh cache,
the other waits for it, and both run the native op with the reference's value.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                     "*.o", "runs", ".pytest_cache", ".benchmarks")
USE = """
import torch, fastkd
from fastkd import _native
from fastkd.backends import choose
from fastkd.ops.logits import kd_reference
s, t = torch.randn(64, 1000), torch.randn(64, 1000)
assert 'native' in fastkd.backends() and choose('kd_loss', 'cpu') == 'native', fastkd.backends()
print(float(fastkd.KDLoss()(s, t)), float(kd_reference(s, t, 4.0)), _native.path())
"""


def source_tree(where: Path) -> Path:
    """The repository's sources copied to ``where`` (as a clone would have them, without build outputs)."""
    shutil.copytree(ROOT, where, ignore=NOT_SOURCES)
    return where


def user_env(**extra: str) -> dict[str, str]:
    """The environment without fastkd's settings (CI sets FASTKD_REQUIRE_NATIVE and FASTKD_CACHE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTKD_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


def test_the_sdist_carries_every_source_and_header(tmp_path):
    src = source_tree(tmp_path / "src")
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=src, capture_output=True, text=True,
                          check=True, env=user_env()).stdout.split()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert {"csrc/cpu/ops.h", "csrc/cpu/vec.h", "csrc/cuda/crd.cu", "csrc/cuda/crd.cuh"} <= wanted
    assert wanted <= names, sorted(wanted - names)
    assert {"MANIFEST.in", "CMakeLists.txt", "setup.py", "fastkd/_native/plan.py", ".ci/run", "scripts/dev",
            "tests/test_install.py"} <= names
    assert not any(n.endswith((".so", ".o")) for n in names)


@pytest.mark.install
def test_plain_pip_install_gets_native_kernels_on_first_use(tmp_path):
    if torch.version.cuda is not None or torch.version.hip is not None:
        pytest.skip("installs the CPU torch that this test environment runs into a fresh environment")
    times = {}
    start = time.perf_counter()
    src, venv = source_tree(tmp_path / "src"), tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    torch_install = subprocess.run(pip + [f"torch=={torch.__version__}"], env=user_env(), capture_output=True, text=True)
    assert torch_install.returncode == 0, torch_install.stderr[-3000:]
    times["venv + torch"] = time.perf_counter() - start

    start = time.perf_counter()
    built = subprocess.run([str(python), "-m", "pip", "install", "."], cwd=src, env=user_env(), capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "fastkd-0.1.0-py3-none-any.whl" in built.stdout  # no platform tag: no binary inside
    times["pip install ."] = time.perf_counter() - start
    package = Path(subprocess.run([str(python), "-c", "import fastkd, os; print(os.path.dirname(fastkd.__file__))"],
                                  cwd=tmp_path, env=user_env(FASTKD_BUILD_NATIVE="0"), capture_output=True, text=True,
                                  check=True).stdout.strip())
    assert package.is_relative_to(venv) and not list(package.glob("_C*.so"))
    assert (package / "csrc" / "cpu" / "ops.h").is_file() and (package / "csrc" / "cuda" / "crd.cu").is_file()

    start = time.perf_counter()
    env = user_env(FASTKD_CACHE=str(tmp_path / "cache"))
    users = [subprocess.Popen([str(python), "-c", USE], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [user.communicate(timeout=1200) for user in users]
    times["first use (compile)"] = time.perf_counter() - start
    for user, (out, err) in zip(users, outs):
        assert user.returncode == 0, err
        kd, reference, path = out.split()
        assert float(kd) == pytest.approx(float(reference), rel=1e-5)
        assert Path(path).is_relative_to(tmp_path / "cache")
    errs = "".join(err for _, err in outs)
    assert errs.count("fastkd: compiling the native kernels for torch") == 1, errs
    assert errs.count("fastkd: waiting for another process that is compiling") == 1, errs
    assert outs[0][0].split()[2] == outs[1][0].split()[2]  # one build, loaded by both

    again = subprocess.run([str(python), "-c", USE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr == "", again.stderr  # built: loaded without a word
    doctor = subprocess.run([str(venv / "bin" / "fastkd"), "doctor"], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert doctor.returncode == 0 and "loaded from" in doctor.stdout, doctor.stdout + doctor.stderr
    print(", ".join(f"{name}: {seconds:.0f} s" for name, seconds in times.items()))

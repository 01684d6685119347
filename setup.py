"""Builds fastkd: the package with its C++ sources, and, when torch is here, the native library ``fastkd._C``.

Every wheel carries the C++ sources (csrc/, copied into the package as fastkd/csrc) so that fastkd
compiles its kernels for whatever torch it meets, on first use or by ``fastkd build`` (see
fastkd/_native). The library is also compiled here, ahead of time, when torch can be imported at
build time (``pip install --no-build-isolation .``, or ``-e .``); it is used when it matches the
installed torch. A plain ``pip install .`` builds in an isolated environment without torch: a
pure-Python wheel. ``FASTKD_BUILD_NATIVE=0`` skips the compile here too; a failed compile leaves
the package to compile on first use, unless ``FASTKD_REQUIRE_NATIVE=1`` makes it an error. CUDA
sources are compiled when a CUDA toolkit and a CUDA torch are both present (``FASTKD_BUILD_CUDA=0``
turns that off). Sources and flags come from fastkd/_native/plan.py, as for the build on first use.
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _say(message):
    print(f"fastkd setup: {message}", file=sys.stderr)


def _plan_module():
    """fastkd/_native/plan.py, loaded by its path (importing fastkd would import the whole package)."""
    spec = importlib.util.spec_from_file_location("fastkd_build_plan", ROOT / "fastkd" / "_native" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their class's module up
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as fastkd/csrc, so that wheels carry the sources."""

    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install finds csrc/ beside the package
            target = Path(self.build_lib) / "fastkd" / "csrc"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / "csrc", target, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def native_extension():
    """(ext_modules, cmdclass) for the ahead-of-time build, or ([], {}) when it is not made here."""
    if os.environ.get("FASTKD_BUILD_NATIVE", "1") == "0":
        _say("FASTKD_BUILD_NATIVE=0: not compiling fastkd._C")
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable here (an isolated build): fastkd compiles its native kernels on first "
             "use, or run `fastkd build` after installing")
        return [], {}
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        if os.environ.get("FASTKD_REQUIRE_NATIVE") == "1":
            raise SystemExit("fastkd setup: FASTKD_REQUIRE_NATIVE=1 but no C++ compiler was found")
        _say("no C++ compiler was found: installing without fastkd._C")
        return [], {}

    plan = _plan_module().plan_for(Path("csrc"))  # relative paths: setuptools wants them so
    flags = {"cxx": list(plan.cxx), "nvcc": list(plan.nvcc)}
    os.environ.update(_plan_module().cuda_arch_env(plan.cuda))  # no GPU visible: name the architectures
    kind = cpp_extension.CUDAExtension if plan.cuda else cpp_extension.CppExtension
    ext = kind("fastkd._C", list(plan.sources), extra_compile_args=flags, extra_link_args=list(plan.ldflags))

    class BuildOrSkip(cpp_extension.BuildExtension):
        """Builds the extension; a failed compile leaves the package to compile it on first use."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure falls back to the build on first use
                if os.environ.get("FASTKD_REQUIRE_NATIVE") == "1":
                    raise
                _say(f"compiling fastkd._C failed ({exc}); fastkd will report it, or compile it, on first use")

    return [ext], {"build_ext": BuildOrSkip}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})

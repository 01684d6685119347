"""Builds fastkd and, when it can, its native extension ``fastkd._C``.

The extension needs torch at build time, so build with ``--no-build-isolation`` (an isolated
build environment would fetch another torch). Without torch or without a C++ compiler, or with
``FASTKD_BUILD_NATIVE=0``, or when compiling fails, the package installs without it and runs on
the torch backend. CUDA kernels (csrc/cuda/*.cu + their torch bindings csrc/cuda/*.cpp) are added when a CUDA toolkit and a CUDA build
of torch are both present (``FASTKD_BUILD_CUDA=0`` turns that off).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(message):
    print(f"fastkd setup: {message}", file=sys.stderr)


def _skip(reason):
    """Build without the extension, unless FASTKD_REQUIRE_NATIVE=1 makes that an error."""
    if os.environ.get("FASTKD_REQUIRE_NATIVE") == "1":
        raise SystemExit(f"fastkd setup: FASTKD_REQUIRE_NATIVE=1 but {reason}")
    _say(f"{reason}: installing without the native extension")
    return [], {}


def native_extension():
    """(ext_modules, cmdclass) for the native extension, or ([], {}) when it cannot be built."""
    if os.environ.get("FASTKD_BUILD_NATIVE", "1") == "0":
        return _skip("FASTKD_BUILD_NATIVE=0")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _skip("torch is not importable at build time (build with --no-build-isolation)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return _skip("no C++ compiler was found")

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # ATen's at::parallel_for is a header template: with an OpenMP build of torch it splits the work only in
    # code compiled with -fopenmp; without the flag every parallel_for of the extension runs on one thread.
    openmp = ["-fopenmp"] if torch._C.has_openmp and sys.platform.startswith("linux") else []
    flags = {"cxx": ["-O3", "-std=c++17"] + openmp}
    use_cuda = (os.environ.get("FASTKD_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None
                and cpp_extension.CUDA_HOME is not None and cuda_sources)
    if use_cuda:
        flags["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math"]
        flags["cxx"].append("-DFASTKD_WITH_CUDA")
        ext = cpp_extension.CUDAExtension("fastkd._C", sources + cuda_sources, extra_compile_args=flags,
                                          extra_link_args=openmp)
    else:
        ext = cpp_extension.CppExtension("fastkd._C", sources, extra_compile_args=flags, extra_link_args=openmp)

    class BuildOrSkip(cpp_extension.BuildExtension):
        """Builds the extension; a failed compile leaves a working pure-Python package."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure falls back to torch
                if os.environ.get("FASTKD_REQUIRE_NATIVE") == "1":
                    raise
                _say(f"building the native extension failed ({exc}); installing without it")

    return [ext], {"build_ext": BuildOrSkip}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""What a build of fastkd's native library is made of: its sources, its flags and its tag.

setup.py (which loads this file by its path, before fastkd can be imported) and the build on first
use (:mod:`fastkd._native.jit`) both take their sources and flags from :func:`plan_for`, so the two
compile the same library and recognise each other's builds. Only the standard library is imported
here; :func:`plan_for` imports torch.

A build's tag says what it was built for and from::

    fastkd-build:torch=2.13.0+cpu;variant=cpu;python=cpython-311;build=<hash of the sources and flags>

It is compiled into the library (``FASTKD_BUILD_TAG``, a character array that csrc/fastkd.cpp keeps
in the file), so that :func:`read_tag` can read it from the file's bytes before anything loads the
library: a library built for another torch fails to load, or registers fastkd's kernels twice.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

TAG_PREFIX = "fastkd-build:"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
# No -std: torch's cpp_extension adds the standard its headers need (C++17 up to some release, C++20 since:
# torch 2.14's headers use std::strong_ordering and concepts), and a -std of ours would replace it.
CXX_FLAGS = ["-O3", "-g0"]  # -g0: no debug information (Python's own CFLAGS carry -g)
NVCC_FLAGS = ["-O3", "--use_fast_math"]


@dataclass(frozen=True)
class Plan:
    """One build: what to compile and with which flags, for the torch and Python running now."""

    root: Path                 # the csrc folder
    sources: tuple[str, ...]   # absolute paths of the translation units
    cuda: bool                 # whether the CUDA sources are in (a CUDA torch and a CUDA toolkit)
    tag: str
    cxx: tuple[str, ...]       # flags of the C++ compiler, the tag's define included
    nvcc: tuple[str, ...]
    ldflags: tuple[str, ...]

    @property
    def fields(self) -> dict[str, str]:
        return parse_tag(self.tag)

    @property
    def key(self) -> str:
        """The name of this build's folder in the cache: one per torch, variant, Python and hash."""
        f = self.fields
        return f"torch-{f['torch']}-{f['variant']}-{f['python']}-{f['build']}"

    def mismatch(self, tag: str | None) -> str | None:
        """Why a library with ``tag`` cannot be loaded by this process (``None`` when it can).

        The variant is not compared: a build without CUDA kernels still serves CPU tensors.
        """
        if tag is None:
            return "has no build tag (built by an older fastkd, or by CMake), so its torch is unknown"
        found, want = parse_tag(tag), self.fields
        if found.get("torch") != want["torch"]:
            return f"was built for torch {found.get('torch')}, but torch {want['torch']} is installed"
        if found.get("python") != want["python"]:
            return f"was built for {found.get('python')}, but this is {want['python']}"
        if found.get("build") != want["build"]:
            return f"was built from other sources or flags than {self.root} holds (edited since?)"
        return None


def source_root(package_dir: Path) -> Path | None:
    """The csrc folder: inside the installed package (wheels carry a copy), else beside it (a checkout)."""
    for candidate in (package_dir / "csrc", package_dir.parent / "csrc"):
        if (candidate / "fastkd.cpp").is_file():
            return candidate
    return None


def source_files(root: Path) -> list[Path]:
    """Every source and header under ``root``, in a fixed order."""
    return sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())


def _digest(root: Path, flags: list[str]) -> str:
    h = hashlib.sha256()
    for path in source_files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join(flags).encode())
    return h.hexdigest()[:16]


def plan_for(root: Path) -> Plan:
    """The build of the sources under ``root`` for the installed torch.

    CUDA sources (csrc/cuda/*.cu and their torch bindings csrc/cuda/*.cpp) are in when torch is a
    CUDA build and a CUDA toolkit is found, unless ``FASTKD_BUILD_CUDA=0``.
    """
    import torch

    cpp = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    cuda_sources = sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
    cuda = False
    if cuda_sources and torch.version.cuda is not None and os.environ.get("FASTKD_BUILD_CUDA", "1") != "0":
        from torch.utils.cpp_extension import CUDA_HOME  # imports setuptools: only on a CUDA torch

        cuda = CUDA_HOME is not None
    # ATen's at::parallel_for is a header template: with an OpenMP build of torch it splits the work only in
    # code compiled with -fopenmp; without the flag every parallel_for of the library runs on one thread.
    openmp = ["-fopenmp"] if torch._C.has_openmp and sys.platform.startswith("linux") else []
    digest = _digest(root, CXX_FLAGS + openmp + NVCC_FLAGS)
    variant = f"cu{torch.version.cuda}" if cuda else "cpu"
    tag = (f"{TAG_PREFIX}torch={torch.__version__};variant={variant};"
           f"python={sys.implementation.cache_tag};build={digest}")
    cxx = CXX_FLAGS + openmp + (["-DFASTKD_WITH_CUDA"] if cuda else []) + [tag_define(tag)]
    return Plan(root=root, sources=tuple(str(p) for p in cpp + (cuda_sources if cuda else [])), cuda=cuda,
                tag=tag, cxx=tuple(cxx), nvcc=tuple(NVCC_FLAGS if cuda else ()), ldflags=tuple(openmp))


# GPUs the CUDA kernels are compiled for when no GPU is visible to ask (a build machine, a CUDA torch on a
# CPU-only machine): torch derives the list from the visible GPUs and, finding none, fails with an IndexError
# inside cpp_extension. Ampere (A100) and Hopper (H100 / H200), plus PTX that newer GPUs compile at load.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_arch_env(cuda: bool) -> dict[str, str]:
    """What a build of a plan with CUDA sources needs in its environment: ``TORCH_CUDA_ARCH_LIST`` set to
    :data:`DEFAULT_CUDA_ARCHS` when the user set none and no GPU is visible (else nothing: torch's own choice,
    the visible GPUs' architectures, or the user's list)."""
    if not cuda or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return {}
    import torch

    return {} if torch.cuda.is_available() and torch.cuda.device_count() > 0 else {"TORCH_CUDA_ARCH_LIST":
                                                                                     DEFAULT_CUDA_ARCHS}


def tag_define(tag: str) -> str:
    """The compiler flag that puts ``tag`` into the library: its bytes as numbers, which no shell,
    ninja file or preprocessor rewrites (csrc/fastkd.cpp: ``char tag[] = {FASTKD_BUILD_TAG, 0}``)."""
    return "-DFASTKD_BUILD_TAG=" + ",".join(str(b) for b in tag.encode("ascii"))


def parse_tag(tag: str) -> dict[str, str]:
    """``{"torch": ..., "variant": ..., "python": ..., "build": ...}`` from a tag."""
    body = tag[len(TAG_PREFIX):] if tag.startswith(TAG_PREFIX) else tag
    return dict(item.split("=", 1) for item in body.split(";") if "=" in item)


def read_tag(library: Path) -> str | None:
    """The build tag inside a compiled library, read from its bytes (``None`` when it has none)."""
    try:
        with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(TAG_PREFIX.encode())
            if start < 0:
                return None
            end = data.find(b"\0", start, start + 512)
            return data[start:end if end >= 0 else start + 512].decode("ascii", "replace")
    except (OSError, ValueError):  # unreadable, or empty (mmap refuses a 0-byte file)
        return None

"""Which backends exist here and which one an op uses: the one table of fastkd's kernels.

Three backends compute fastkd's ops:

* ``torch``: the readable PyTorch reference in :mod:`fastkd.ops`; always available, the oracle
  of every test and the fallback for any op another backend does not implement.
* ``native``: the C++ extension ``fastkd._C`` (CPU kernels, and CUDA kernels when it was built
  with a CUDA toolkit); available when it is built for the installed torch: ahead of time (``setup.py``,
  ``fastkd build``) or on first use (:mod:`fastkd._native`).
* ``triton``: Triton kernels for CUDA tensors; available when triton imports and a GPU (or the
  interpreter, ``TRITON_INTERPRET=1``) is there.

The selection is ``auto`` unless the environment variable ``FASTKD_BACKEND`` or a
``with fastkd.use_backend(name):`` block says otherwise. ``auto`` takes, per call and by the
device of the inputs, the fastest backend that implements the op: CUDA tensors → triton, then
native; CPU tensors → native.

The table maps (op, backend) to the custom op that backend runs (:mod:`fastkd.ops._library` enters
every op as it is defined; a backend's module enters its own), for the devices it serves. An op family
asks :func:`kernel_for` once per call and calls the op it gets, or runs its published torch computation
when the choice is ``torch``; from there the torch dispatcher alone decides what runs (the native library's
C++ kernel on CPU tensors, the Triton kernels inside a Triton op). A backend's modules are imported the first
time the table looks the backend up where it is available (:func:`on_first_use`, :func:`load`): defining
Triton ops imports Triton and, in torch 2.13, torch's compiler, seconds that an import of fastkd does not pay.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Iterator

import torch

NAMES = ("torch", "native", "triton")
_CHOICES = NAMES + ("auto",)
_AUTO_ORDER = {"cuda": ("triton", "native"), "cpu": ("native",)}

# The innermost ``use_backend`` block wins (process-wide; a plain list so torch.compile traces it).
_selected: list[str] = []
# op -> backend -> device type -> (implementation, available): one backend may run a different op per device
_impls: dict[str, dict[str, dict[str, tuple[Callable, Callable[[str | None], bool] | None]]]] = {}


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {', '.join(_CHOICES)}")
    return name


def native_available() -> bool:
    from fastkd import _native

    return _native.loaded()


_triton_found: list[bool] = []  # a plain list, not functools.lru_cache, so torch.compile traces it


def _triton_installed() -> bool:
    """Whether triton can be imported (looked up once: every op call asks, and a lookup costs ~70 µs)."""
    if not _triton_found:
        _triton_found.append(importlib.util.find_spec("triton") is not None)
    return _triton_found[0]


def triton_available() -> bool:
    if not _triton_installed():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.cuda.is_available()


def backends() -> list[str]:
    """The backends available on this machine, ``torch`` first."""
    found = ["torch"]
    if native_available():
        found.append("native")
    if triton_available():
        found.append("triton")
    return found


def current() -> str:
    """The selected backend name (``auto`` unless a block or ``FASTKD_BACKEND`` chose one)."""
    if _selected:
        return _selected[-1]
    return _check_name(os.environ.get("FASTKD_BACKEND", "auto"), "FASTKD_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Select the backend for the ops run inside the ``with`` block.

    Naming a backend that is not available here raises ``ValueError``; an op the named backend
    does not implement runs on the torch reference.
    """
    _check_name(name, "use_backend")
    if name not in ("auto", "torch") and name not in backends():
        raise ValueError(f"use_backend: backend {name!r} is not available here (available: {backends()})")
    _selected.append(name)
    try:
        yield name
    finally:
        _selected.pop()


_loaders: dict[str, list[Callable[[], object]]] = {}  # backend -> imports of its modules, each run once


def on_first_use(backend: str, load: Callable[[], object]) -> None:
    """Run ``load`` (an import of one of ``backend``'s modules, which registers its ops) before the table first
    looks ``backend`` up."""
    _loaders.setdefault(backend, []).append(load)


def load(backend: str) -> bool:
    """Import ``backend``'s modules now, if they are not yet (:func:`implementations` does, for the backends
    available here). True."""
    for pending in _loaders.pop(backend, ()):
        pending()
    return True


# torch.compile calls load() while tracing instead of tracing into it (an import cannot be traced): what
# torch.compiler.assume_constant_result(load) marks, without importing torch._dynamo here
load._dynamo_marked_constant = True


def register(op: str, backend: str, fn: Callable, devices: tuple[str, ...] = ("cpu", "cuda"),
             available: Callable[[str | None], bool] | None = None) -> Callable:
    """Record ``fn`` (a custom op; for ``torch``, the reference) as ``backend``'s implementation of ``op`` for
    tensors on ``devices``.

    ``available(device_type)`` (optional) tells at call time whether the implementation can run
    here for that device (say, whether the native library was built with CUDA kernels); the
    backend's own availability is always required too.
    """
    if backend not in NAMES:
        raise ValueError(f"register: unknown backend {backend!r}")
    for device in devices:
        _impls.setdefault(op, {}).setdefault(backend, {})[device] = (fn, available)
    _chosen.clear()
    return fn


def _runs(op: str, backend: str, device_type: str | None) -> bool:
    """Whether ``backend`` has an implementation of ``op`` for ``device_type`` (any device: None) that can run."""
    entries = _impls.get(op, {}).get(backend, {})
    devices = entries if device_type is None else [device_type] if device_type in entries else []
    return any(entries[d][1] is None or entries[d][1](device_type) for d in devices)


def implementations(op: str, device_type: str | None = None) -> list[str]:
    """The backends that implement ``op`` (for ``device_type``, when given) and can run here."""
    have = backends()
    return [name for name in NAMES if name in have and load(name) and _runs(op, name, device_type)]


# choose()'s answers, by everything that can change them while the process runs (the registry clears
# it; the native library's availability is settled by the first lookup, and TRITON_INTERPRET is taken as
# it is at the first call, as triton itself reads it when its kernels are defined): every op call asks,
# and working the answer out costs several times what a small fused op takes on a CPU.
_chosen: dict[tuple, str] = {}


def choose(op: str, device_type: str) -> str:
    """The backend that runs ``op`` on tensors of ``device_type`` under the current selection."""
    name = current()
    if torch.compiler.is_compiling():
        return _choose(op, device_type, name)
    key = (op, device_type, name)
    found = _chosen.get(key)
    if found is None:
        found = _chosen[key] = _choose(op, device_type, name)
    return found


def _device_type(x: torch.Tensor) -> str:
    """``x``'s device type (a CPU tensor's without building its ``torch.device``: this runs on every op call)."""
    return "cpu" if x.is_cpu else x.device.type


def choose_for(op: str, x: torch.Tensor) -> str:
    """:func:`choose` for the device of tensor ``x``."""
    return choose(op, _device_type(x))


def _choose(op: str, device_type: str, name: str) -> str:
    impls = implementations(op, device_type)
    if name == "auto":
        return next((c for c in _AUTO_ORDER.get(device_type, ()) if c in impls), "torch")
    return name if name in impls else "torch"


def dispatch(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` that :func:`choose` picks (the torch reference for a device no backend serves)."""
    entries = _impls[op][choose(op, device_type)]
    return (entries[device_type] if device_type in entries else next(iter(entries.values())))[0]


def kernel_for(op: str, x: torch.Tensor) -> Callable | None:
    """The op the backend chosen for ``x``'s device runs for ``op``; ``None`` when that is the ``torch``
    backend (the caller then runs its published computation)."""
    device_type = _device_type(x)
    name = choose(op, device_type)
    return None if name == "torch" else _impls[op][name][device_type][0]

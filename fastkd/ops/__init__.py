"""Custom ops (torch.library, namespace ``fastkd``): one reference module per op family, and its backends.

Each family's reference module (:mod:`~fastkd.ops.crd`, :mod:`~fastkd.ops.logits`,
:mod:`~fastkd.ops.similarity`, :mod:`~fastkd.ops.nst`, :mod:`~fastkd.ops.cosine`) holds the readable torch
references (the oracle of the tests and the ``torch`` backend), defines its ops with
:func:`fastkd.ops._library.define`, and gives :mod:`fastkd.functional` one function per loss that runs the
backend :func:`fastkd.backends.kernel_for` picks.

A backend's module is ``<family>_<backend>.py`` (``crd_triton.py``, ``crd_native.py``, ...): it defines that
backend's ops with :func:`fastkd.ops._library.variant`, which enters them in the backend table. No module
imports one: they are found here by their names and imported when their backend can run in this process
(``native``: always, they only declare the C++ kernels' ops; ``triton``: when triton is installed and a GPU or
the interpreter is there), so a CPU-only process never imports Triton.
"""
import importlib
import pkgutil

from fastkd import _native
from fastkd.backends import triton_available
from fastkd.ops import cosine, crd, crd_shard, logits, nst, philox, similarity  # noqa: F401  (they define the ops)

_RUNS_HERE = {"native": lambda: True, "triton": triton_available}

for _found in pkgutil.iter_modules(__path__):
    _backend = _found.name.rpartition("_")[2]
    if _backend in _RUNS_HERE and _RUNS_HERE[_backend]():
        importlib.import_module(f"{__name__}.{_found.name}")
_native.load()

"""Custom ops (torch.library, namespace ``fastkd``): one reference module per op family, and its backends.

Each family's reference module (:mod:`~fastkd.ops.crd`, :mod:`~fastkd.ops.logits`,
:mod:`~fastkd.ops.similarity`, :mod:`~fastkd.ops.iusp`, :mod:`~fastkd.ops.nst`, :mod:`~fastkd.ops.cosine`) holds
the readable torch references (the oracle of the tests and the ``torch`` backend), defines its ops with
:func:`fastkd.ops._library.define`, and gives :mod:`fastkd.functional` one function per loss that runs the
backend :func:`fastkd.backends.kernel_for` picks.

A backend's module is ``<family>_<backend>.py`` (``crd_triton.py``, ``crd_native.py``, ...): it defines that
backend's ops with :func:`fastkd.ops._library.variant`, which enters them in the backend table. No module
imports one: they are found here by their names, and the backend table imports them the first time it looks
their backend up where it is available (:func:`fastkd.backends.on_first_use`), so a CPU-only process never
imports Triton, and an import of fastkd never defines a Triton op.
"""
import functools
import importlib
import pkgutil

from fastkd import _native
from fastkd.backends import NAMES, on_first_use
from fastkd.ops import cosine, crd, crd_shard, iusp, logits, nst, philox, similarity  # noqa: F401  (they define the ops)

for _found in pkgutil.iter_modules(__path__):
    _backend = _found.name.rpartition("_")[2]
    if _backend in NAMES and _backend != "torch":
        on_first_use(_backend, functools.partial(importlib.import_module, f"{__name__}.{_found.name}"))
_native.load()

"""Loads the C++ extension ``fastkd._C`` when ``setup.py`` built it.

The extension registers CPU (and, when built with CUDA, CUDA) kernels for schemas that
:mod:`fastkd.ops` defines in Python, so it must be loaded after those definitions.
"""
from __future__ import annotations

_state: dict[str, object] = {}


def load() -> bool:
    """Import the extension once; ``True`` when it is there."""
    if "loaded" not in _state:
        try:
            from fastkd import _C  # noqa: F401
        except ImportError as exc:
            _state["loaded"], _state["error"] = False, exc
        else:
            _state["loaded"], _state["error"] = True, None
    return bool(_state["loaded"])


def loaded() -> bool:
    return load()


def error() -> BaseException | None:
    """Why the extension did not load (``None`` when it did)."""
    load()
    return _state["error"]  # type: ignore[return-value]

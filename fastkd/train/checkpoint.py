"""Checkpoints written atomically, read without running code, and the RNG states a resumed run needs.

``save_checkpoint`` writes to a temporary file in the target's folder, flushes it to disk and
renames it over the target (:func:`fastkd.data._files.atomic_write`): a process killed at any
moment leaves either the previous checkpoint or the new one, never a truncated file under the
name. The file gets the permissions of any file the user creates (0644 under the usual umask).

Every file is read with ``torch.load(weights_only=True)`` (tensors, numbers, strings and the
containers of them; no pickled code runs) or, for ``.safetensors``, by safetensors:
:func:`read_weights` takes a model's weights from a fastkd checkpoint, a RepDistiller one
(``{'model': state_dict, ...}``), an exported ``.safetensors`` file or a bare state_dict.
"""
from __future__ import annotations

import os
import pickle
import random
import re
from typing import Any

import numpy as np
import torch

from fastkd.data._files import atomic_write

SAFETENSORS = ".safetensors"
# the keys under which checkpoints keep a model's state_dict: fastkd's own, RepDistiller's, common trainers'
_WEIGHTS_KEYS = ("student", "model", "state_dict")


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and (when present) every CUDA device's generator states, as
    plain values and tensors (so a checkpoint holding them loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also the NumPy arrays older checkpoints hold)."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (``torch.save``-able) to ``path`` atomically."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as stream:
        torch.save(payload, stream)


def _numpy_globals() -> list:
    """The NumPy types an older fastkd checkpoint's RNG state pickled (arrays: data, never code)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _unreadable(path: str, exc: Exception) -> ValueError:
    """The error for a file torch cannot read as a weights-only checkpoint: pickled code (refused, with the
    way out for a trusted file), or a damaged / foreign file."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return ValueError(
            f"{path} holds a pickled Python object ({found.group(1)}), not only tensors and plain values; fastkd "
            "reads weights with torch.load(weights_only=True), so that a downloaded file cannot run code, and "
            "refuses it. If you trust the file, re-save its weights once: python -c \"import torch; s = "
            "torch.load('FILE', weights_only=False); torch.save(s.get('model', s.get('state_dict', s)), "
            "'weights.pt')\" and use weights.pt")
    if isinstance(exc, (pickle.UnpicklingError, IndexError, KeyError)) or not str(exc).strip():
        what = type(exc).__name__  # torch's own text here is about weights_only, not about the file
    else:
        what = str(exc).strip().splitlines()[0].split(". ")[0]
    return ValueError(f"{path} is not a readable checkpoint ({what}): the file is truncated or damaged, "
                      "or was not written by torch.save; copy or download it again")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any ``torch.save`` dict of tensors and
    plain values; a ``.safetensors`` file comes back as its state_dict) without running pickled code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.endswith(SAFETENSORS):
        return _read_safetensors(path, map_location)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - random or cut bytes fail in the unpickler in any way it can
        # (UnpicklingError, EOFError, BadZipFile, but also IndexError 'pop from empty list', KeyError, ValueError
        # ... from opcodes read out of garbage): each one means the file is not a checkpoint
        raise _unreadable(path, exc) from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} does not hold a checkpoint dict (got {type(payload).__name__})")
    return payload


def _read_safetensors(path: str, map_location) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    device = "cpu" if map_location is None else str(map_location)
    try:
        return load_file(path, device=device)
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header or body
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A model's state_dict from ``path``: a fastkd checkpoint (``{'student': ...}``), a RepDistiller
    checkpoint (``{'model': ...}``), ``{'state_dict': ...}``, a ``.safetensors`` file or a bare state_dict."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """:func:`read_weights`, and the name of the model the file says the weights are of: fastkd's checkpoints
    and exports record it; other files (RepDistiller's, a bare state_dict) do not (``None``)."""
    path = os.fspath(path)
    state = load_checkpoint(path)
    if path.endswith(SAFETENSORS):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as stream:
            return state, (stream.metadata() or {}).get("model")
    recipe = state.get("recipe") if isinstance(state.get("recipe"), dict) else {}
    recorded = (state.get("meta") or {}).get("student") if isinstance(state.get("meta"), dict) else None
    recorded = recorded or (recipe.get("student") or {}).get("name")
    for key in _WEIGHTS_KEYS:
        if isinstance(state.get(key), dict):
            return state[key], recorded
    return state, None

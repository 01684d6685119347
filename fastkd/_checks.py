"""Input checks shared by every loss: clear errors that name the argument.

Structural checks (type, dtype, rank, shape, device, an empty batch) cost nothing and always
run. Value checks (NaN / Inf, index ranges) read the data, which is a host sync on a GPU: they run
unless ``fastkd.value_checks(False)`` (or ``FASTKD_VALUE_CHECKS=0``) turned them off, and they are
skipped by themselves while ``torch.compile`` traces or a CUDA graph captures, where a sync is
not allowed, and for tensors that hold no data (``meta`` tensors, fake tensors).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

# The innermost ``value_checks`` block wins; the default is read once, when fastkd is imported.
# (A plain list rather than a ContextVar: torch.compile traces through list reads.)
_value_checks: list[bool] = [os.environ.get("FASTKD_VALUE_CHECKS", "1") != "0"]


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the data-reading checks (NaN, index range) on or off inside a ``with`` block."""
    _value_checks.append(bool(enabled))
    try:
        yield
    finally:
        _value_checks.pop()


def values_checked() -> bool:
    """Whether value checks run now (see the module docstring)."""
    if torch.compiler.is_compiling() or not _value_checks[-1]:
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def has_values(x: torch.Tensor) -> bool:
    """Whether ``x``'s values can be read: not a ``meta`` tensor, not a fake one (``FakeTensorMode``)."""
    return not (x.is_meta or is_fake(x))


def tensor(name: str, x, *, ndim: int | Sequence[int] | None = None, min_ndim: int | None = None,
           floating: bool = True) -> torch.Tensor:
    """``x`` must be a tensor (floating point unless ``floating=False``) of the given rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def finite(name: str, x: torch.Tensor) -> None:
    """``x`` must hold no NaN or Inf (a value check)."""
    if values_checked() and x.is_floating_point() and has_values(x) and not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, same_shape: bool = True,
         same_batch: bool = True) -> None:
    """Two inputs of one loss: same device and dtype, same shape (or batch size); both finite.

    With ``same_batch`` (dim 0 is the batch) the batch must also hold a sample: every loss refuses
    an empty batch, whose mean is undefined, before computing anything (:func:`nonempty`).
    """
    if not (a.is_cpu and b.is_cpu) and a.device != b.device:  # (two CPU tensors: no torch.device built)
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; put both on one device")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} has dtype {b.dtype} but {name_a} has {a.dtype}; cast them to one dtype")
    if same_shape and a.shape != b.shape:
        raise ValueError(f"{name_b} has shape {tuple(b.shape)} but {name_a} has {tuple(a.shape)}; they must match")
    if same_batch and a.shape[:1] != b.shape[:1]:
        raise ValueError(f"{name_b} has batch size {b.shape[0]} but {name_a} has {a.shape[0]}; they must match")
    if same_batch and a.dim():
        nonempty(name_a, a)
    if values_checked():
        finite(name_a, a)
        finite(name_b, b)


def min_batch(name: str, x: torch.Tensor, least: int, why: str, *, dim: int = 0) -> None:
    """The loss is defined only for batches (dimension ``dim`` of ``x``) of at least ``least`` samples."""
    if x.shape[dim] < least:
        raise ValueError(f"{name} has batch size {x.shape[dim]} (shape {tuple(x.shape)}); this loss needs at "
                         f"least {least} ({why})")


def width(name: str, x: torch.Tensor, expected: int, owner: str) -> None:
    """``x`` flattened per sample ([B, ...] → [B, F]) has F = ``expected`` features, the width the
    loss was built for (``owner`` names that constructor argument, e.g. ``"s_dim"``)."""
    features = math.prod(x.shape[1:])
    if features != expected:
        raise ValueError(f"{name} has {features} features per sample (shape {tuple(x.shape)}) but {owner} = "
                         f"{expected}; build the loss with {owner}={features} or pass the feature it was built for")


def nonempty(name: str, x: torch.Tensor, *, dim: int = 0) -> None:
    """The batch (dimension ``dim`` of ``x``) holds at least one sample: the one rule by which every loss
    refuses B = 0 (its mean over the batch is 0/0), before it computes anything or touches any state."""
    min_batch(name, x, 1, "an empty batch has no loss", dim=dim)


def index(name: str, idx, upper: int, *, shape: Sequence[int] | None = None,
          device: torch.device | None = None) -> torch.Tensor:
    """``idx`` must be an int64 tensor of ``shape`` on ``device`` with values in [0, upper)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 indices, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {idx.dtype}")
    if shape is not None and tuple(idx.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(idx.shape)}")
    if device is not None and idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the inputs are on {device}")
    if values_checked() and idx.numel() > 0 and has_values(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds index {bad}, outside [0, {upper})")
    return idx


def module_device(name: str, x: torch.Tensor, module: torch.nn.Module) -> None:
    """An input must be on the device and dtype of the loss's own parameters."""
    for p in module.parameters():
        if x.device != p.device:
            raise ValueError(f"{name} is on {x.device} but the loss's parameters are on {p.device}; move one")
        if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} has dtype {x.dtype} but the loss's parameters have {p.dtype}")
        return


def pair_of(name_s: str, x_s, name_t: str, x_t, *, ndim: int | Sequence[int] | None = None,
            min_ndim: int | None = None, same_shape: bool = False) -> None:
    """Student and teacher inputs: each a floating tensor of the given rank, then :func:`pair`."""
    tensor(name_s, x_s, ndim=ndim, min_ndim=min_ndim)
    tensor(name_t, x_t, ndim=ndim, min_ndim=min_ndim)
    pair(name_s, x_s, name_t, x_t, same_shape=same_shape)


def named_pairs(name_s: str, g_s, name_t: str, g_t) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """Two tensors → one named (student, teacher) pair; two equal-length sequences → one per position."""
    if isinstance(g_s, torch.Tensor) and isinstance(g_t, torch.Tensor):
        return [(name_s, g_s, name_t, g_t)]
    if isinstance(g_s, (list, tuple)) and isinstance(g_t, (list, tuple)):
        if len(g_s) != len(g_t):
            raise ValueError(f"{name_t} holds {len(g_t)} maps but {name_s} holds {len(g_s)}; they must pair up")
        if not g_s:
            raise ValueError(f"{name_s} and {name_t} are empty; give at least one pair of maps")
        return [(f"{name_s}[{i}]", s, f"{name_t}[{i}]", t) for i, (s, t) in enumerate(zip(g_s, g_t))]
    raise TypeError(f"{name_s} and {name_t} must both be tensors or both sequences of tensors, "
                    f"got {type(g_s).__name__} and {type(g_t).__name__}")


def number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real hyper-parameter (> 0 with ``positive``, ≥ 0 with ``nonnegative``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")
    return value


def integer(name: str, value, least: int) -> int:
    """An integer hyper-parameter (a dimension, an order, a count) that must be ≥ ``least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be ≥ {least}, got {value}")
    return int(value)

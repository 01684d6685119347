"""fastkd's precision rule: accumulate in fp32 whatever the input dtype.

fp16 / bf16 inputs are computed in fp32 (a sum of B·C terms in fp16 keeps ~3 decimal digits, and exp(s/T)
leaves its range at s/T > 11), fp32 stays fp32 and fp64 stays fp64 (the tests' oracles run in float64).
The losses, the ops' torch references and their fake implementations all take the dtype from here, so
the dtype a fused op promises is the dtype its reference computes in.
"""
from __future__ import annotations

import torch


def accumulation_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype computations on ``x`` (a tensor or a dtype) accumulate in: fp32 for fp16 / bf16 / fp32, fp64 for fp64."""
    return torch.promote_types(x if isinstance(x, torch.dtype) else x.dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its accumulation dtype (fp16 / bf16 → fp32; fp32 / fp64 as they are, without a copy)."""
    return x.to(accumulation_dtype(x))

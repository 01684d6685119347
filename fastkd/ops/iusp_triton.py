"""Triton backend of ``fastkd::iusp_loss`` on CUDA tensors: the Triton op ``fastkd::iusp_loss_triton``, whose
backward is the batched product M_b·X_b of ``relation_grad_triton`` (:mod:`fastkd.ops.similarity_triton`).

The semantics are :func:`fastkd.ops.iusp.iusp_with_grad_reference`'s. Per call: one batched Gram launch per side
(``matmul_kernel``, grid over the B sequences; the padded frames' entries are computed and never read), one
``iusp_rows_kernel`` launch over the B·T rows of both sides (SP's row chain over each sequence's own length; padded
rows and columns get 0) and one batched ``symmetrize_kernel`` launch per side. Buffers: the two Grams and two
[B, T, T] ∂L/∂G (fp32), the [B, T] loss partials. float64 inputs run the reference. No host sync.
"""
from __future__ import annotations

import torch
import triton

from fastkd.kernels import similarity as kernels
from fastkd.ops import iusp as ops
from fastkd.ops import similarity_triton
from fastkd.ops._library import TRITON_DTYPES, traceable, variant
from fastkd.ops.similarity import ROWNORM_EPS, relation_autograd

_MAX_FRAMES = 1024  # one row of a Gram in one program's registers


def _check(f_s: torch.Tensor, f_t: torch.Tensor, lengths: torch.Tensor) -> None:
    for arg, x in (("student", f_s), ("teacher", f_t)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"iusp_loss: the {arg} input must be a [B, T, C] tensor, got "
                             f"{getattr(x, 'shape', type(x))}")
        if x.dtype not in TRITON_DTYPES + (torch.float64,):
            raise TypeError(f"iusp_loss: the {arg} input must be float32, float16 or bfloat16, got {x.dtype}")
    if f_s.shape[:2] != f_t.shape[:2] or not 0 < f_s.shape[1] <= _MAX_FRAMES or f_s.shape[0] == 0:
        raise ValueError(f"iusp_loss: expected one B ≥ 1 and one T between 1 and {_MAX_FRAMES}, got "
                         f"{tuple(f_s.shape[:2])} and {tuple(f_t.shape[:2])}")
    if f_s.device != f_t.device or f_s.dtype != f_t.dtype or lengths.device != f_s.device:
        raise ValueError(f"iusp_loss: the inputs and lengths must share a device (and the inputs a dtype), got "
                         f"{f_s.device}/{f_s.dtype}, {f_t.device}/{f_t.dtype} and {lengths.device}")
    if lengths.dtype != torch.int64 or tuple(lengths.shape) != (f_s.shape[0],):
        raise ValueError(f"iusp_loss: lengths must be int64 [B], got {lengths.dtype} {tuple(lengths.shape)}")


def iusp_loss(f_s: torch.Tensor, f_t: torch.Tensor, lengths: torch.Tensor):
    _check(f_s, f_t, lengths)
    if f_s.dtype == torch.float64:
        return ops.iusp_with_grad_reference(f_s, f_t, lengths)
    b, t = f_s.shape[:2]
    f32 = dict(dtype=torch.float32, device=f_s.device)
    g_s = similarity_triton.matmul(f_s, f_s.transpose(1, 2), torch.empty(b, t, t, **f32))
    g_t = similarity_triton.matmul(f_t, f_t.transpose(1, 2), torch.empty(b, t, t, **f32))
    d, rows = torch.empty(2, b, t, t, **f32), torch.empty(b, t, **f32)
    block = max(16, triton.next_power_of_2(t))
    traceable(kernels.iusp_rows_kernel)[(t, b)](g_s, g_t, d[0], d[1], lengths.contiguous(), rows, b, t, ROWNORM_EPS,
                                                BLOCK_T=block)
    m_s, m_t = torch.empty_like(g_s), torch.empty_like(g_t)
    traceable(kernels.symmetrize_kernel)[(t, b)](d[0], g_s, d[0], m_s, t, NORM_PATH=False, BLOCK_B=block)
    traceable(kernels.symmetrize_kernel)[(t, b)](d[1], g_t, d[1], m_t, t, NORM_PATH=False, BLOCK_B=block)
    return rows.sum(), m_s, m_t


IUSP = variant(ops.IUSP, "triton", "cuda", iusp_loss, autograd=relation_autograd(similarity_triton.RELATION_GRAD))

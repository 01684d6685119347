"""Triton backend of ``fastkd::nst_loss``: ``fastkd::nst_loss_triton``, for CUDA tensors.

Each channel is L2-normalised over space (``rownorm_kernel``, fp32 copies of the maps and their norms), then
the cheaper of the two Gram forms (:mod:`fastkd.ops.nst`) runs on the Gram kernel of
:func:`fastkd.ops.similarity_triton.matmul`: the spatial HW × HW Grams with ``nst_spatial_kernel`` as the
epilogue, or the three channel Grams reduced by ``sumsq_scale_kernel``; the gradients go back through the
normalisation with ``rownorm_backward_kernel``, in the maps' dtype. float64 maps run the reference. No host sync.
"""
from __future__ import annotations

import torch
import triton

from fastkd.kernels import similarity as kernels
from fastkd.ops import nst
from fastkd.ops._library import TRITON_DTYPES, traceable, variant
from fastkd.ops.similarity_triton import matmul

_NST_BLOCK = 1024


def _sumsq_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ x² of a contiguous fp32 tensor (on the device), x scaled in place afterwards."""
    blocks = triton.cdiv(x.numel(), _NST_BLOCK)
    partial = torch.empty(blocks, dtype=torch.float32, device=x.device)
    traceable(kernels.sumsq_scale_kernel)[(blocks,)](x, partial, x.numel(), scale, BLOCK=_NST_BLOCK)
    return partial.sum()


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor):
    """(loss, ∂loss/∂f_s, ∂loss/∂f_t) of [B, C, HW] maps, as :func:`fastkd.ops.nst.nst_with_grad_reference`:
    the spatial or channel form by the same size rule as the CPU kernel."""
    for arg, x in (("student", f_s), ("teacher", f_t)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"nst_loss: the {arg} map must be a [B, C, HW] tensor, got {getattr(x, 'shape', type(x))}")
        if x.dtype not in TRITON_DTYPES + (torch.float64,):
            raise TypeError(f"nst_loss: the {arg} map must be float32, float16 or bfloat16, got {x.dtype}")
    if f_s.shape[0] != f_t.shape[0] or f_s.shape[2] != f_t.shape[2] or f_s.dtype != f_t.dtype:
        raise ValueError(f"nst_loss: the maps must share batch size, HW and dtype, got {tuple(f_s.shape)} "
                         f"{f_s.dtype} and {tuple(f_t.shape)} {f_t.dtype}")
    if f_s.dtype == torch.float64:
        return nst.nst_with_grad_reference(f_s, f_t)
    b, c_s, hw = f_s.shape
    c_t = f_t.shape[1]
    f32 = dict(dtype=torch.float32, device=f_s.device)
    block = max(16, triton.next_power_of_2(hw))
    eps = nst.ROWNORM_EPS
    units, norms = [], []
    for x in (f_s.contiguous(), f_t.contiguous()):
        unit, norm = torch.empty(x.shape, **f32), torch.empty(x.shape[0] * x.shape[1], **f32)
        traceable(kernels.rownorm_kernel)[(unit.shape[0] * unit.shape[1],)](x, unit, norm, hw, eps, BLOCK=block)
        units.append(unit)
        norms.append(norm)
    us, ut = units
    if 2 * hw * hw * (c_s + c_t) < (2 * c_s * c_s + 3 * c_s * c_t + c_t * c_t) * hw:  # spatial form
        a = matmul(us.transpose(1, 2), us, torch.empty(b, hw, hw, **f32))
        c = matmul(ut.transpose(1, 2), ut, torch.empty(b, hw, hw, **f32))
        rows = torch.empty(b * hw, **f32)
        traceable(kernels.nst_spatial_kernel)[(b * hw,)](a, c, rows, hw, 1.0 / c_s, 1.0 / c_t, 4.0 / (b * c_s),
                                              -4.0 / (b * c_s * c_t), BLOCK=block)
        loss = rows.sum() / b
        grad_us = matmul(us, a, torch.empty_like(us))
        grad_ut = matmul(ut, c, torch.empty_like(ut))
    else:  # channel form
        kss = matmul(us, us.transpose(1, 2), torch.empty(b, c_s, c_s, **f32))
        ktt = matmul(ut, ut.transpose(1, 2), torch.empty(b, c_t, c_t, **f32))
        kst = matmul(us, ut.transpose(1, 2), torch.empty(b, c_s, c_t, **f32))
        ss = _sumsq_scale(kss, 4.0 / (b * c_s * c_s))
        tt = _sumsq_scale(ktt, 1.0)
        st = _sumsq_scale(kst, -4.0 / (b * c_s * c_t))
        loss = (tt / (c_t * c_t) + ss / (c_s * c_s) - 2 * st / (c_s * c_t)) / b
        grad_us = matmul(kss, us, torch.empty_like(us)) + matmul(kst, ut, torch.empty_like(us))
        grad_ut = matmul(kst.transpose(1, 2), us, torch.empty_like(ut))
    grads = []
    for x, unit, norm, grad_unit in ((f_s, us, norms[0], grad_us), (f_t, ut, norms[1], grad_ut)):
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        traceable(kernels.rownorm_backward_kernel)[(unit.shape[0] * unit.shape[1],)](unit, norm, grad_unit.contiguous(), grad, hw,
                                                                           eps, BLOCK=block)
        grads.append(grad)
    return loss, grads[0], grads[1]


NST = variant(nst.NST, "triton", "cuda", nst_loss)

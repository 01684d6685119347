"""Triton backend of the batch-relation ops (``fastkd::sp_loss``, ``cckd_loss``, ``pkt_loss``,
``rkd_distance_loss``, ``rkd_angle_loss``) and of their backward product M·X (``relation_grad``), on CUDA
tensors: the Triton ops ``fastkd::<op>_triton``, whose autograd formula's product is ``relation_grad_triton``.

Each op has the semantics of its ``*_with_grad_reference`` in :mod:`fastkd.ops.similarity`; the
kernels are in :mod:`fastkd.kernels.similarity`. Per call: two Gram launches (``matmul_kernel``,
fp32 accumulation), one row-epilogue launch over the B rows of both sides, and one ``symmetrize``
launch per side (RKD: four row passes, its distances needing their batch mean first; RKD's angles: one
pairs launch per side, one row launch over anchors and far sides, one finish). Buffers: the two Grams and
two B × B ∂L/∂G (fp32), B-sized partials (the angles: five more B × B); the loss is the sum of the row partials.
float64 inputs run the reference (the kernels compute in fp32). No host sync.
"""
from __future__ import annotations

import torch
import triton

from fastkd.kernels import similarity as kernels
from fastkd.ops import similarity as ops
from fastkd.ops._library import TRITON_DTYPES, traceable, variant

_MAX_BATCH = 1024
_BLOCK = 32  # M, N and K tiles of matmul_kernel
_ANGLE_TILE = 2048  # entries of one [BLOCK_J, BLOCK_B] tile of rkd_angle_rows_kernel


def _check(name: str, f_s: torch.Tensor, f_t: torch.Tensor) -> None:
    for arg, x in (("student", f_s), ("teacher", f_t)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name}: the {arg} input must be a [B, D] tensor, got {getattr(x, 'shape', type(x))}")
        if x.dtype not in TRITON_DTYPES + (torch.float64,):
            raise TypeError(f"{name}: the {arg} input must be float32, float16 or bfloat16, got {x.dtype}")
    if f_s.shape[0] != f_t.shape[0] or not 0 < f_s.shape[0] <= _MAX_BATCH:
        raise ValueError(f"{name}: expected one batch size between 1 and {_MAX_BATCH}, "
                         f"got {f_s.shape[0]} and {f_t.shape[0]}")
    if f_s.device != f_t.device or f_s.dtype != f_t.dtype:
        raise ValueError(f"{name}: the inputs must share device and dtype, got {f_s.device}/{f_s.dtype} and "
                         f"{f_t.device}/{f_t.dtype}")


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None = None,
           row: torch.Tensor | None = None, col: torch.Tensor | None = None) -> torch.Tensor:
    """out = scale·a·b for [M, K] a and [K, N] b (any strides; batched when both are 3-D), fp32 accumulation;
    with ``row`` / ``col`` (fp32 [M] / [N], both or neither) entry (i, j) is also scaled by row[i]·col[j]."""
    batched = a.dim() == 3
    a3, b3, c3 = (a, b, out) if batched else (a.unsqueeze(0), b.unsqueeze(0), out.unsqueeze(0))
    z, m, k = a3.shape
    n = b3.shape[2]
    half = a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype
    grid = (triton.cdiv(m, _BLOCK), triton.cdiv(n, _BLOCK), z)
    traceable(kernels.matmul_kernel)[grid](a3, b3, c3, scale if scale is not None else a3, row if row is not None else a3,
                                col if col is not None else a3, m, n, k, *a3.stride(), *b3.stride(), *c3.stride(),
                                BLOCK_M=_BLOCK, BLOCK_N=_BLOCK, BLOCK_K=_BLOCK, HALF=half,
                                HAS_SCALE=scale is not None, HAS_ROW_COL=row is not None)
    return out


def gram(x: torch.Tensor) -> torch.Tensor:
    """G = XXᵀ, fp32 [B, B]."""
    b = x.shape[0]
    return matmul(x, x.T, torch.empty(b, b, dtype=torch.float32, device=x.device))


def relation_grad(x: torch.Tensor, m: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad_loss·M·X in X's dtype (backward of every op here)."""
    if torch.float64 in (x.dtype, m.dtype):
        return ops.relation_grad_reference(x, m, grad_loss)
    scale = grad_loss.to(torch.float32).reshape(1).contiguous()
    return matmul(m, x, torch.empty_like(x, memory_format=torch.contiguous_format), scale)


def _launch(f_s, f_t):
    b = f_s.shape[0]
    g_s, g_t = gram(f_s), gram(f_t)
    f32 = dict(dtype=torch.float32, device=f_s.device)
    return b, g_s, g_t, torch.empty(2, b, b, **f32), torch.empty(b, **f32), max(16, triton.next_power_of_2(b))


def _symmetrize(d, g, factor, block, norm_path):
    b = g.shape[0]
    m = torch.empty_like(g)
    traceable(kernels.symmetrize_kernel)[(b,)](d, g, factor if factor is not None else d, m, b, NORM_PATH=norm_path,
                                    BLOCK_B=block)
    return m


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor):
    _check("sp_loss", f_s, f_t)
    if f_s.dtype == torch.float64:
        return ops.sp_with_grad_reference(f_s, f_t)
    b, g_s, g_t, d, rows, block = _launch(f_s, f_t)
    traceable(kernels.sp_rows_kernel)[(b,)](g_s, g_t, d[0], d[1], rows, b, 2.0 / (b * b), ops.ROWNORM_EPS, BLOCK_B=block)
    return rows.sum() / (b * b), _symmetrize(d[0], g_s, None, block, False), _symmetrize(d[1], g_t, None, block, False)


def cckd_loss(e_s: torch.Tensor, e_t: torch.Tensor, gamma: float, order: int):
    _check("cckd_loss", e_s, e_t)
    if e_s.dtype == torch.float64:
        return ops.cckd_with_grad_reference(e_s, e_t, gamma, order)
    b, g_s, g_t, d, rows, block = _launch(e_s, e_t)
    coef = torch.tensor(ops.taylor_coefficients(gamma, order), dtype=torch.float32).to(e_s.device, non_blocking=True)
    factor = torch.empty(2, b, dtype=torch.float32, device=e_s.device)
    traceable(kernels.cckd_rows_kernel)[(b,)](g_s, g_t, d[0], d[1], factor[0], factor[1], rows, coef, b, 2.0 / (b * b),
                                   ops.ROWNORM_EPS, ORDER=order, BLOCK_B=block)
    return (rows.sum() / (b * b), _symmetrize(d[0], g_s, factor[0], block, True),
            _symmetrize(d[1], g_t, factor[1], block, True))


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float):
    _check("pkt_loss", f_s, f_t)
    if f_s.dtype == torch.float64:
        return ops.pkt_with_grad_reference(f_s, f_t, eps)
    b, g_s, g_t, d, rows, block = _launch(f_s, f_t)
    factor = torch.empty(2, b, dtype=torch.float32, device=f_s.device)
    traceable(kernels.pkt_rows_kernel)[(b,)](g_s, g_t, d[0], d[1], factor[0], factor[1], rows, b, 1.0 / (b * b), eps,
                                  BLOCK_B=block)
    return (rows.sum() / (b * b), _symmetrize(d[0], g_s, factor[0], block, True),
            _symmetrize(d[1], g_t, factor[1], block, True))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor):
    _check("rkd_distance_loss", f_s, f_t)
    if f_s.dtype == torch.float64:
        return ops.rkd_distance_with_grad_reference(f_s, f_t)
    b, g_s, g_t, d, rows, block = _launch(f_s, f_t)
    f32 = dict(dtype=torch.float32, device=f_s.device)
    sums, weighted = torch.empty(3, b, **f32), torch.empty(b, **f32)
    eps = ops.RKD_DIST_EPS
    traceable(kernels.rkd_sums_kernel)[(b,)](g_s, g_t, sums, b, eps, BLOCK_B=block)
    traceable(kernels.rkd_rows_kernel)[(b,)](g_s, g_t, sums, d[0], rows, weighted, b, 1.0 / (b * b), eps, BLOCK_B=block)
    traceable(kernels.rkd_grad_kernel)[(b,)](g_s, sums, d[0], weighted, d[1], b, eps, BLOCK_B=block)
    m_s = torch.empty_like(g_s)
    traceable(kernels.rkd_finish_kernel)[(b,)](d[1], m_s, b, BLOCK_B=block)
    return rows.sum() / (b * b), m_s


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor):
    _check("rkd_angle_loss", f_s, f_t)
    if f_s.dtype == torch.float64:
        return ops.rkd_angle_with_grad_reference(f_s, f_t)
    b, g_s, g_t, d, rows, block = _launch(f_s, f_t)
    q_s, r_s, rho_s, q_t, r_t = torch.empty(5, b, b, dtype=torch.float32, device=f_s.device)
    tol, eps = ops.RKD_ANGLE_ZERO_TOL * torch.finfo(torch.float32).eps, ops.RKD_ANGLE_EPS
    traceable(kernels.rkd_angle_pairs_kernel)[(b,)](g_s, q_s, r_s, rho_s, b, tol, eps, HAS_RHO=True, BLOCK_B=block)
    traceable(kernels.rkd_angle_pairs_kernel)[(b,)](g_t, q_t, r_t, r_t, b, tol, eps, HAS_RHO=False, BLOCK_B=block)
    traceable(kernels.rkd_angle_rows_kernel)[(b,)](q_s, r_s, rho_s, q_t, r_t, d[0], d[1], rows, b, 1.0 / b**3,
                                        BLOCK_J=max(1, min(block, _ANGLE_TILE // block)), BLOCK_B=block,
                                        num_warps=8 if block >= 128 else 4)
    d[0] += d[1]
    m_s = torch.empty_like(g_s)
    traceable(kernels.rkd_finish_kernel)[(b,)](d[0], m_s, b, BLOCK_B=block)
    return rows.sum() / b**3, m_s


RELATION_GRAD = variant(ops.RELATION_GRAD, "triton", "cuda", relation_grad)
_AUTOGRAD = ops.relation_autograd(RELATION_GRAD)
SP = variant(ops.SP, "triton", "cuda", sp_loss, autograd=_AUTOGRAD)
CCKD = variant(ops.CCKD, "triton", "cuda", cckd_loss, autograd=_AUTOGRAD)
PKT = variant(ops.PKT, "triton", "cuda", pkt_loss, autograd=_AUTOGRAD)
RKD_DISTANCE = variant(ops.RKD_DISTANCE, "triton", "cuda", rkd_distance_loss, autograd=_AUTOGRAD)
RKD_ANGLE = variant(ops.RKD_ANGLE, "triton", "cuda", rkd_angle_loss, autograd=_AUTOGRAD)

"""Triton backend of the logit-loss ops: ``fastkd::kd_loss_triton``, ``dkd_loss_triton`` and their backward ops
``kd_loss_backward_triton``, ``dkd_loss_backward_triton`` (which the two forward ops' autograd formulas call).

Each function has the semantics of the reference of the same role in :mod:`fastkd.ops.logits`; the kernels
are in :mod:`fastkd.kernels.logits`. One program per row, BLOCK columns per chunk: the forward passes keep
per-row statistics only ([B, 5] or [B, 7] fp32) and the backward passes write the gradients, so the extra
memory is the gradients themselves. No host sync: the upstream gradient is read by the kernels.
float64 logits run the torch contract (the kernels compute in fp32).
"""
from __future__ import annotations

import torch
import triton

from fastkd.kernels import logits as kernels
from fastkd.ops import logits as logits_ops
from fastkd.ops._library import TRITON_DTYPES, traceable, variant

_MAX_BLOCK = 4096


def _rows(op: str, logits_s: torch.Tensor, logits_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits with unit column stride (a copy only when they are not)."""
    if logits_s.dim() != 2 or logits_s.shape != logits_t.shape or logits_s.numel() == 0:
        raise ValueError(f"{op}: logits_s and logits_t must be non-empty [B, C] of one shape, got "
                         f"{tuple(logits_s.shape)} and {tuple(logits_t.shape)}")
    if logits_s.dtype not in TRITON_DTYPES or logits_t.dtype != logits_s.dtype:
        raise TypeError(f"{op}: the logits must share a dtype among float32, float16, bfloat16, got "
                        f"{logits_s.dtype} and {logits_t.dtype}")
    unit = lambda x: x if x.stride(1) == 1 else x.contiguous()  # noqa: E731
    return unit(logits_s), unit(logits_t)


def _gradients(xs: torch.Tensor, xt: torch.Tensor, teacher_grad: bool):
    """The backward ops' outputs, the student's gradient and the teacher's (an empty [0] tensor without
    ``teacher_grad``), and the kernel's teacher-gradient argument: that gradient, or a one-element stand-in where
    nothing is written (TEACHER False), so that no output is passed twice to one launch (torch.compile copies
    each written argument apart)."""
    grad_s = torch.empty(xs.shape, dtype=xs.dtype, device=xs.device)
    if teacher_grad:
        grad_t = torch.empty_like(grad_s)
        return grad_s, grad_t, grad_t
    return grad_s, xt.new_empty(0), grad_s.new_empty(1)


def _launch(classes: int, block: int | None) -> dict:
    block = block or min(_MAX_BLOCK, max(16, triton.next_power_of_2(classes)))
    return dict(BLOCK=block, num_warps=8 if block >= 2048 else 4)


def kd_loss(logits_s, logits_t, temperature, *, block=None):
    """(loss, stats [B, 5] = (M_t, ℓ_t, KL_b, ρ, M_s)), as :func:`fastkd.ops.logits.kd_forward_reference`."""
    if logits_s.dtype == torch.float64:
        return logits_ops.kd_forward_reference(logits_s, logits_t, temperature)
    xs, xt = _rows("kd_loss", logits_s, logits_t)
    batch, classes = xs.shape
    stats = torch.empty(batch, 5, dtype=torch.float32, device=xs.device)
    traceable(kernels.kd_forward_kernel)[(batch,)](xs, xt, stats, classes, xs.stride(0), xt.stride(0), 1.0 / temperature,
                                        **_launch(classes, block))
    return stats[:, 2].sum() * (temperature**2 / batch), stats


def kd_loss_backward(grad, logits_s, logits_t, stats, temperature, teacher_grad, *, block=None):
    """(d/d logits_s, d/d logits_t or [0]), as :func:`fastkd.ops.logits.kd_backward_reference`."""
    if logits_s.dtype == torch.float64:
        return logits_ops.kd_backward_reference(grad, logits_s, logits_t, stats, temperature, teacher_grad)
    xs, xt = _rows("kd_loss_backward", logits_s, logits_t)
    batch, classes = xs.shape
    grad_s, grad_t, grad_t_arg = _gradients(xs, xt, teacher_grad)
    traceable(kernels.kd_backward_kernel)[(batch,)](
        grad.contiguous(), xs, xt, stats.float().contiguous(), grad_s, grad_t_arg, classes,
        xs.stride(0), xt.stride(0), 1.0 / temperature, temperature / batch, TEACHER=bool(teacher_grad),
        **_launch(classes, block))
    return grad_s, grad_t


def _check_target(op, target, batch, classes):
    if target.shape != (batch,) or target.dtype != torch.int64:
        raise ValueError(f"{op}: target must be an int64 tensor of shape ({batch},), got "
                         f"{target.dtype} {tuple(target.shape)}")
    if classes < 2:
        raise ValueError(f"{op}: DKD needs at least 2 classes, got {classes}")
    return target.contiguous()


def dkd_loss(logits_s, logits_t, target, alpha, beta, temperature, *, block=None):
    """(loss, stats [B, 7] = (M_t, ℓ_t, TCKD_b, NCKD_b, ρ, M_s, K_b)), as
    :func:`fastkd.ops.logits.dkd_forward_reference`.

    ``target`` must hold indices in [0, C) (the functional loss checks it; here it is not read on the host).
    """
    if logits_s.dtype == torch.float64:
        return logits_ops.dkd_forward_reference(logits_s, logits_t, target, alpha, beta, temperature)
    xs, xt = _rows("dkd_loss", logits_s, logits_t)
    batch, classes = xs.shape
    y = _check_target("dkd_loss", target, batch, classes)
    stats = torch.empty(batch, 7, dtype=torch.float32, device=xs.device)
    traceable(kernels.dkd_forward_kernel)[(batch,)](xs, xt, y, stats, classes, xs.stride(0), xt.stride(0), 1.0 / temperature,
                                         **_launch(classes, block))
    terms = stats[:, 2] * alpha + stats[:, 3] * beta
    return terms.sum() * (temperature**2 / batch), stats


def dkd_loss_backward(grad, logits_s, logits_t, target, stats, alpha, beta, temperature, teacher_grad, *,
                      block=None):
    """(d/d logits_s, d/d logits_t or [0]), as :func:`fastkd.ops.logits.dkd_backward_reference`."""
    if logits_s.dtype == torch.float64:
        return logits_ops.dkd_backward_reference(grad, logits_s, logits_t, target, stats, alpha, beta, temperature,
                                                 teacher_grad)
    xs, xt = _rows("dkd_loss_backward", logits_s, logits_t)
    batch, classes = xs.shape
    y = _check_target("dkd_loss_backward", target, batch, classes)
    grad_s, grad_t, grad_t_arg = _gradients(xs, xt, teacher_grad)
    traceable(kernels.dkd_backward_kernel)[(batch,)](
        grad.contiguous(), xs, xt, y, stats.float().contiguous(), grad_s, grad_t_arg,
        classes, xs.stride(0), xt.stride(0), 1.0 / temperature, temperature / batch, float(alpha), float(beta),
        TEACHER=bool(teacher_grad), **_launch(classes, block))
    return grad_s, grad_t


KD_LOSS_BACKWARD = variant(logits_ops.KD_LOSS_BACKWARD, "triton", "cuda", kd_loss_backward)
DKD_LOSS_BACKWARD = variant(logits_ops.DKD_LOSS_BACKWARD, "triton", "cuda", dkd_loss_backward)
KD_LOSS = variant(logits_ops.KD_LOSS, "triton", "cuda", kd_loss, autograd=logits_ops.kd_autograd(KD_LOSS_BACKWARD))
DKD_LOSS = variant(logits_ops.DKD_LOSS, "triton", "cuda", dkd_loss,
                   autograd=logits_ops.dkd_autograd(DKD_LOSS_BACKWARD))

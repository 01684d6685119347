"""NST's op: the polynomial-kernel MMD between the channels of two maps, with its gradients.

Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017.

Per sample, S ([C_s, HW]) and T ([C_t, HW]) are the maps with each channel L2-normalised over
space (F.normalize, eps 1e-12), and k(x, y) = (x·y)²::

    loss = mean_{b,i,j} k(t_i, t_j) + mean_{b,i,j} k(s_i, s_j) − 2 mean_{b,i,j} k(s_i, t_j)

with the teacher-teacher term carrying no gradient (RepDistiller's ``NSTLoss``). Since
Σ_ij (s_i·t_j)² = ‖STᵀ‖²_F = ⟨SᵀS, TᵀT⟩_F, the same number is, per sample,
‖SᵀS / C_s − TᵀT / C_t‖²_F / B: kernels pick the cheaper of the C × C channel Grams and the
HW × HW spatial Grams (for the last stage of a CIFAR ResNet, 256 channels on 8 × 8, the spatial
form needs a quarter of the multiply-adds).

``fastkd::nst_loss(Tensor f_s, Tensor f_t) -> (Tensor loss, Tensor grad_s, Tensor grad_t)`` takes
[B, C, HW] maps of one HW; the gradients (for a unit upstream gradient, in the inputs' dtype) are
computed in the same pass, so backward only scales them. Loss in fp32 (fp64 for fp64 inputs).
Kernels: the reference (any device), native C++ on CPU, Triton on CUDA (an op of the Triton backend's
module). :func:`nst_with_grad_reference` is its contract, written in the channel form;
:func:`nst_reference` the published computation (the ``torch`` backend); :func:`nst` runs one pair of maps on
the backend the table picks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd._precision import accumulation_dtype, upcast
from fastkd.backends import kernel_for
from fastkd.ops._library import Autograd, define
from fastkd.ops.similarity import ROWNORM_EPS, rownorm_backward


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over (batch, row of a, row of b) of (a_i · b_j)²: NST's polynomial kernel."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``NSTLoss`` on [B, C, HW] maps, in the accumulation dtype: mean k(t, t) (no gradient)
    + mean k(s, s) − 2 mean k(s, t) over the channels normalised over space."""
    s, t = F.normalize(upcast(f_s), dim=2), F.normalize(upcast(f_t), dim=2)
    return _poly_kernel_mean(t, t).detach() + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


def nst_with_grad_reference(f_s: torch.Tensor, f_t: torch.Tensor):
    """``fastkd::nst_loss``: (loss, ∂loss/∂f_s, ∂loss/∂f_t) for [B, C, HW] maps, channel form."""
    acc = accumulation_dtype(f_s)
    x_s, x_t = f_s.to(acc), f_t.to(acc)
    b, c_s, c_t = x_s.shape[0], x_s.shape[1], x_t.shape[1]
    n_s, n_t = x_s.norm(dim=2, keepdim=True), x_t.norm(dim=2, keepdim=True)
    s, t = x_s / n_s.clamp_min(ROWNORM_EPS), x_t / n_t.clamp_min(ROWNORM_EPS)
    k_ss, k_tt, k_st = s @ s.transpose(1, 2), t @ t.transpose(1, 2), s @ t.transpose(1, 2)
    loss = (k_tt.pow(2).sum() / c_t ** 2 + k_ss.pow(2).sum() / c_s ** 2 - 2 * k_st.pow(2).sum() / (c_s * c_t)) / b
    grad_kss = k_ss * (4.0 / (b * c_s * c_s))  # ∂/∂K_ss, already symmetrised
    grad_kst = k_st * (-4.0 / (b * c_s * c_t))
    grad_unit_s = grad_kss @ s + grad_kst @ t
    grad_unit_t = grad_kst.transpose(1, 2) @ s
    grad_s = rownorm_backward(s.flatten(0, 1), n_s.flatten(0, 1), grad_unit_s.flatten(0, 1), ROWNORM_EPS)
    grad_t = rownorm_backward(t.flatten(0, 1), n_t.flatten(0, 1), grad_unit_t.flatten(0, 1), ROWNORM_EPS)
    return loss, grad_s.view_as(f_s).to(f_s.dtype), grad_t.view_as(f_t).to(f_t.dtype)


def _fake(f_s, f_t):
    return f_s.new_empty((), dtype=accumulation_dtype(f_s)), torch.empty_like(f_s), torch.empty_like(f_t)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, *unused):
    """The gradients were taken in the forward pass: scale them by the upstream gradient (new tensors: the
    saved ones are also outputs of the op, which a .grad must not alias)."""
    grad_s, grad_t = ctx.saved_tensors
    return grad_s * grad_loss.to(grad_s.dtype), grad_t * grad_loss.to(grad_t.dtype)


AUTOGRAD = Autograd(_setup_context, _backward)
NST = define("nst_loss(Tensor f_s, Tensor f_t) -> (Tensor, Tensor, Tensor)", nst_with_grad_reference, _fake, AUTOGRAD)


def nst(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """NST of one pair of [B, C, HW] maps (one HW) on the chosen backend."""
    op = kernel_for("nst_loss", f_s)
    return nst_reference(f_s, f_t) if op is None else op(f_s, f_t)[0]

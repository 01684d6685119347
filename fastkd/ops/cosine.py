"""The batch cosine-similarity matrix as one op: a Gram-type product with the normalisation fused in.

C_ij = ⟨a_i, b_j⟩ / (max(‖a_i‖, ε) · max(‖b_j‖, ε)) for a [N, D] and b [M, D] — what SSKD compares
(each rotated view's embedding against every upright one, 3B × B) and what ``F.normalize(a) @
F.normalize(b).T`` computes through two normalised copies and a product.

``fastkd::cosine_matrix(Tensor a, Tensor b, float eps) -> (Tensor c, Tensor inv_a, Tensor inv_b)``
returns C and the inverse norms r_a = 1/max(‖a_i‖, ε), r_b (fp32 for fp16 / bf16 / fp32 inputs,
fp64 for fp64). The Triton kernel is the Gram kernel of :mod:`fastkd.kernels.similarity` with
r_a[i]·r_b[j] applied in its epilogue, so no normalised copy of a or b is written. Backward, from
the saved inverse norms, with â = r_a·a, b̂ = r_b·b:

    ∂L/∂â = G·b̂,  ∂L/∂a_i = r_a,i (∂L/∂â_i − ⟨∂L/∂â_i, â_i⟩ â_i)   (no projection where ‖a_i‖ < ε)

and the same for b with Gᵀ·â. Only the product kernels differ by device; the formulas here are the
reference (CPU runs them: the product is one BLAS call there, nothing left to fuse). The Triton kernel is an
op of the Triton backend's module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd._precision import accumulation_dtype, upcast
from fastkd.backends import kernel_for
from fastkd.ops._library import Autograd, define


def inverse_norms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / max(‖x_i‖, eps) per row, in the accumulation dtype."""
    return torch.linalg.vector_norm(upcast(x), dim=1).clamp_min(eps).reciprocal()


def cosine_matrix_reference(a: torch.Tensor, b: torch.Tensor, eps: float):
    """(C, r_a, r_b): the op's contract (see the module doc)."""
    inv_a, inv_b = inverse_norms(a, eps), inverse_norms(b, eps)
    c = (a.to(inv_a.dtype) * inv_a[:, None]) @ (b.to(inv_b.dtype) * inv_b[:, None]).T
    return c, inv_a, inv_b


def _unit_backward(x: torch.Tensor, unit: torch.Tensor, inv: torch.Tensor, grad_unit: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """∂L/∂x for x̂ = x·inv (inv = 1/max(‖x‖, eps)), given x̂ and ∂L/∂x̂."""
    projected = grad_unit - unit * (unit * grad_unit).sum(1, keepdim=True)
    unclamped = (inv < 1.0 / eps)[:, None]  # the norm is above eps: the normalisation is differentiated
    return (torch.where(unclamped, projected, grad_unit) * inv[:, None]).to(x.dtype)


def cosine_matrix_backward(grad_c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor,
                           inv_b: torch.Tensor, eps: float, need_a: bool = True, need_b: bool = True):
    """(∂L/∂a, ∂L/∂b) from ∂L/∂C (see the module doc); None where not needed."""
    grad_c = grad_c.to(inv_a.dtype)
    unit_a = a.to(inv_a.dtype) * inv_a[:, None]
    unit_b = b.to(inv_b.dtype) * inv_b[:, None]
    grad_a = _unit_backward(a, unit_a, inv_a, grad_c @ unit_b, eps) if need_a else None
    grad_b = _unit_backward(b, unit_b, inv_b, grad_c.T @ unit_a, eps) if need_b else None
    return grad_a, grad_b


def cosine_similarity_reference(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """The published computation, normalize(a) @ normalize(b)ᵀ in the accumulation dtype (the ``torch`` backend)."""
    return F.normalize(upcast(a), dim=1, eps=eps) @ F.normalize(upcast(b), dim=1, eps=eps).transpose(0, 1)


def _fake(a, b, eps):
    acc = accumulation_dtype(a)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=acc), a.new_empty(a.shape[0], dtype=acc), \
        a.new_empty(b.shape[0], dtype=acc)


def _setup_context(ctx, inputs, output):
    a, b, eps = inputs
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1], output[2])  # the inverse norms are saved state, not results
    ctx.save_for_backward(a, b, output[1], output[2])


def _backward(ctx, grad_c, _grad_inv_a, _grad_inv_b):
    a, b, inv_a, inv_b = ctx.saved_tensors
    grad_a, grad_b = cosine_matrix_backward(grad_c, a, b, inv_a, inv_b, ctx.eps, *ctx.needs_input_grad[:2])
    return grad_a, grad_b, None


AUTOGRAD = Autograd(_setup_context, _backward)
COSINE_MATRIX = define("cosine_matrix(Tensor a, Tensor b, float eps) -> (Tensor, Tensor, Tensor)",
                       cosine_matrix_reference, _fake, AUTOGRAD)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """C on the chosen backend: the published computation for ``torch``, else the op (a Triton product on CUDA)."""
    op = kernel_for("cosine_matrix", a)
    if op is None:
        return cosine_similarity_reference(a, b, eps)
    return op(a, b, eps)[0]

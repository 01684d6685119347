"""Triton backend of ``fastkd::cosine_matrix``: ``fastkd::cosine_matrix_triton``, for CUDA tensors.

The inverse row norms r_a, r_b come from torch (two small reductions), then one launch of the Gram kernel
(:func:`fastkd.ops.similarity_triton.matmul`) multiplies a·bᵀ with r_a[i]·r_b[j] applied in its epilogue, so
no normalised copy of a or b is written. Semantics: :func:`fastkd.ops.cosine.cosine_matrix_reference`, which
mixed or float64 inputs run (the kernel computes in fp32).
"""
from __future__ import annotations

import torch

from fastkd.ops import cosine
from fastkd.ops._library import variant
from fastkd.ops.similarity_triton import matmul


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, eps: float):
    """(C, r_a, r_b) as :func:`fastkd.ops.cosine.cosine_matrix_reference`: one product with its epilogue."""
    if torch.float64 in (a.dtype, b.dtype) or a.dtype != b.dtype:
        return cosine.cosine_matrix_reference(a, b, eps)
    inv_a, inv_b = cosine.inverse_norms(a, eps), cosine.inverse_norms(b, eps)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    return matmul(a, b.T, out, row=inv_a, col=inv_b), inv_a, inv_b


COSINE_MATRIX = variant(cosine.COSINE_MATRIX, "triton", "cuda", cosine_matrix)

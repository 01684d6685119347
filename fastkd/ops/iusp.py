"""IUSP, SP's sequence form: the op ``fastkd::iusp_loss`` and its torch references.

Intra-utterance similarity preservation (Chang, Kao, Sun & Wang, Interspeech 2020, arXiv 2009.01759) applies
SP (Tung & Mori 2019; :mod:`fastkd.ops.similarity`) inside each sequence instead of across the batch: for
features X_b ([T, C], the frames of sequence b; C may differ between student and teacher) the T × T Gram
G_b = X_b X_bᵀ is row-normalised as SP does, and the student's is matched to the teacher's in squared
Frobenius norm. With lengths L_b (the first L_b frames of sequence b are real, the rest padding) every padded
frame is left out of its sequence's Gram (its row and column), and each sequence is normalised by its own
length::

    Y_b = rownorm(G_b[:L_b, :L_b])          (rownorm: each row over its L2 norm, eps 1e-12, as F.normalize)
    loss = (1/B) Σ_b ‖Y_b^t − Y_b^s‖²_F / L_b²

so each sequence weighs the same whatever its length, and at B = 1 the loss is SP's of the L_1 frames taken as a
batch (SP divides by its batch size squared). With every L_b = T it is Σ_b ‖·‖²_F / (B·T²).

The op is the batched form of ``fastkd::sp_loss``: ``iusp_loss(Tensor f_s, Tensor f_t, Tensor lengths) ->
(loss, m_s, m_t)`` with f ``[B, T, C]``, lengths int64 ``[B]`` in [1, T], and M_b = ∂L/∂G_b + (∂L/∂G_b)ᵀ
(``[B, T, T]``, zero on the padding), so that backward is ∂L/∂X_b = M_b X_b: the batched ``fastkd::relation_grad``.
``loss`` and the M's are fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64. Its contract is
:func:`iusp_with_grad_reference`; :func:`iusp_reference` is the eager computation differentiated by autograd (the
``torch`` backend), and :func:`iusp` runs the loss on the backend the table picks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd._precision import accumulation_dtype, upcast
from fastkd.backends import kernel_for
from fastkd.ops._library import define
from fastkd.ops.similarity import AUTOGRAD, ROWNORM_EPS, rownorm_backward, symmetrized


def frame_pairs(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T, T] bool: entry (b, i, j) is a pair of real frames (i, j < L_b)."""
    valid = torch.arange(frames, device=lengths.device) < lengths.unsqueeze(1)
    return valid.unsqueeze(2) & valid.unsqueeze(1)


def grams(x: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """G_b = X_b X_bᵀ of [B, T, C] X in the accumulation dtype, zero outside ``pairs`` when given."""
    q = upcast(x)
    g = q @ q.transpose(1, 2)
    return g if pairs is None else torch.where(pairs, g, torch.zeros_like(g))


def sequence_weights(lengths: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """1 / (B·L_b²) per sequence, [B, 1, 1]."""
    n = lengths.to(dtype)
    return (1.0 / (batch * n * n)).reshape(-1, 1, 1)


def iusp_with_grad_reference(f_s: torch.Tensor, f_t: torch.Tensor, lengths: torch.Tensor):
    """``fastkd::iusp_loss``: ((1/B) Σ_b ‖rownorm(G_b^s) − rownorm(G_b^t)‖²_F / L_b², M_s, M_t) over the real
    frames; the padded rows and columns of G, and of the M's, are 0."""
    b, t = f_s.shape[:2]
    pairs = frame_pairs(lengths, t)
    g_s, g_t = grams(f_s, pairs), grams(f_t, pairs)
    n_s, n_t = g_s.norm(dim=2, keepdim=True), g_t.norm(dim=2, keepdim=True)
    y_s, y_t = g_s / n_s.clamp_min(ROWNORM_EPS), g_t / n_t.clamp_min(ROWNORM_EPS)
    diff = y_s - y_t
    weight = sequence_weights(lengths, b, g_s.dtype)
    loss = (diff.pow(2) * weight).sum()
    grad_y = diff * (2 * weight)
    m_s = symmetrized(rownorm_backward(y_s, n_s, grad_y, ROWNORM_EPS))
    m_t = symmetrized(rownorm_backward(y_t, n_t, -grad_y, ROWNORM_EPS))
    return loss, m_s, m_t


def iusp_reference(f_s: torch.Tensor, f_t: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The eager computation (autograd differentiates it): per sequence ‖F.normalize(G_t) − F.normalize(G_s)‖²_F,
    over L_b², mean over the batch; without ``lengths`` every frame is real (no masking)."""
    b, t = f_s.shape[:2]
    pairs = None if lengths is None else frame_pairs(lengths, t)
    y_s, y_t = F.normalize(grams(f_s, pairs), dim=2), F.normalize(grams(f_t, pairs), dim=2)
    per_sequence = (y_t - y_s).pow(2).sum(dim=(1, 2))
    if lengths is None:
        return per_sequence.sum() / (b * t * t)
    n = lengths.to(per_sequence.dtype)
    return (per_sequence / (n * n)).mean()


def _fake(f_s, f_t, lengths):
    b, t, acc = f_s.shape[0], f_s.shape[1], accumulation_dtype(f_s)
    return f_s.new_empty((), dtype=acc), f_s.new_empty((b, t, t), dtype=acc), f_s.new_empty((b, t, t), dtype=acc)


IUSP = define("iusp_loss(Tensor f_s, Tensor f_t, Tensor lengths) -> (Tensor, Tensor, Tensor)",
              iusp_with_grad_reference, _fake, AUTOGRAD)


def full_lengths(x: torch.Tensor) -> torch.Tensor:
    """Every sequence of [B, T, C] ``x`` T frames long: int64 [B] on its device."""
    return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)


def iusp(f_s: torch.Tensor, f_t: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """IUSP of [B, T, C] inputs on the chosen backend; ``lengths`` None: every frame is real."""
    op = kernel_for("iusp_loss", f_s)
    if op is None:
        return iusp_reference(f_s, f_t, lengths)
    return op(f_s, f_t, full_lengths(f_s) if lengths is None else lengths)[0]

"""Batch-relation losses: each network's batch becomes a B × B (or B × B × B) relation, and the
student's relations are pulled towards the teacher's.

Values match RepDistiller (SP, CC, RKD, PKT) and the CCKD paper (Peng et al. 2019); METHODS.md
gives each formula. Inputs in fp16 / bf16 are computed in fp32, and the loss comes back in fp32.
None of the math reads tensor values on the host; the only data-reading is the NaN / Inf check
of :mod:`fastkd._checks`, which ``fastkd.value_checks(False)`` turns off. An empty batch (B = 0,
where every mean is 0/0) raises ``ValueError`` naming the student's input, on every backend.

SP, CCKD, PKT and RKD's distance and angle terms run on the fused ops of :mod:`fastkd.ops.similarity`
(native C++ on CPU, Triton on CUDA) unless the ``torch`` backend is selected, which runs the published
computation (also in :mod:`fastkd.ops.similarity`); the functions here check their inputs and flatten them.
"""
from __future__ import annotations

import torch

from fastkd import _checks
from fastkd._precision import upcast
from fastkd.ops import similarity as ops

__all__ = ["sp_loss", "cc_loss", "cckd_loss", "rkd_loss", "pkt_loss"]

# --- SP ---------------------------------------------------------------------------------------

def sp_loss(f_s, f_t) -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori, ICCV 2019), as RepDistiller's ``Similarity``.

    For each pair of maps, with Q = f flattened to B × (C·H·W), G = QQᵀ and ``rownorm`` dividing
    each row by its L2 norm (eps 1e-12)::

        loss = ‖rownorm(G_t) − rownorm(G_s)‖²_F / B²

    Args:
        f_s: student feature map ``[B, ...]``, or a list / tuple of them.
        f_t: teacher feature map ``[B, ...]`` (its C, H, W may differ from the student's), or a
            list / tuple of the same length; the per-pair losses are summed.

    Returns:
        0-dim tensor. Defined for B = 1 (the loss is then 0 unless a row of G is zero).
    """
    pairs = _checks.named_pairs("f_s", f_s, "f_t", f_t)
    for name_s, s, name_t, t in pairs:
        _checks.pair_of(name_s, s, name_t, t, min_ndim=2)
    return sum(ops.sp(_flat(s), _flat(t)) for _, s, _, t in pairs)


def _flat(f: torch.Tensor) -> torch.Tensor:
    """[B, ...] → [B, D]: a relation compares whole samples."""
    return f.reshape(f.shape[0], -1)


# --- CC (RepDistiller form) -------------------------------------------------------------------

def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Correlation congruence, RepDistiller's ``Correlation`` form (Peng et al., ICCV 2019).

    With Δ = |e_s − e_t| (elementwise), the products of consecutive rows::

        loss = 1/(B−1) · Σ_{i<B−1} Σ_d Δ[i, d] · Δ[i+1, d]

    This is the code RepDistiller ships (emailed by the paper's authors), not the paper's kernel
    form: for that, see :func:`cckd_loss`.

    Args:
        e_s, e_t: student and teacher embeddings ``[B, D]`` of the same shape, B ≥ 2.
    """
    _checks.pair_of("e_s", e_s, "e_t", e_t, ndim=2, same_shape=True)
    _checks.min_batch("e_s", e_s, 2, "it pairs each sample with the next one")
    delta = (upcast(e_s) - upcast(e_t)).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


# --- CCKD (paper form) ------------------------------------------------------------------------

def cckd_loss(e_s: torch.Tensor, e_t: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Correlation congruence, the paper's form (Peng et al., "Correlation Congruence for Knowledge
    Distillation", ICCV 2019): a Taylor-expanded Gaussian RBF on L2-normalised embeddings.

    With ê = rownorm(e) and g = ê êᵀ (cosines)::

        k(g) = Σ_{p=0..P} e^{−2γ} (2γ)^p / p! · g^p     (= exp(−γ‖x − y‖²) as P → ∞, for unit x, y)
        loss = mean over the B² entries of (k(g_s) − k(g_t))²

    Args:
        e_s: student embeddings ``[B, D_s]``.
        e_t: teacher embeddings ``[B, D_t]`` (D_t may differ from D_s).
        gamma: the RBF's γ > 0 (paper: 0.4).
        order: the Taylor order P ≥ 0 (paper: 2). At P = 0 k is the constant e^{−2γ}: the loss is 0, with
            a graph and a zero gradient on every backend.

    Returns:
        0-dim tensor; defined for B = 1 (then 0).
    """
    gamma = _checks.number("gamma", gamma, positive=True)
    order = _checks.integer("order", order, 0)
    _checks.pair_of("e_s", e_s, "e_t", e_t, ndim=2)
    return ops.cckd(e_s, e_t, gamma, order)


# --- RKD --------------------------------------------------------------------------------------

def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    """Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019), as RepDistiller's ``RKDLoss``.

    On e = f flattened to ``[B, ·]``, with d_ij = ‖e_i − e_j‖ (RepDistiller's clamped expansion,
    eps 1e-12; d_ii = 0), μ = mean of d over the entries > 0, and a_ijk = cos∠(e_j − e_i, e_k − e_i)::

        loss = w_dist · smooth_l1(d_s / μ_s, d_t / μ_t) + w_angle · smooth_l1(a_s, a_t)

    smooth-L1 with β = 1, mean over the B² (distances) and B³ (angles) entries. The teacher side
    carries no gradient. RepDistiller's μ = ``d[d > 0].mean()`` is a boolean-mask gather (a host
    sync); here μ = Σ d·[d > 0] / Σ [d > 0], the same number.

    Args:
        f_s, f_t: student and teacher features ``[B, ...]`` (flattened per sample; their widths
            may differ), B ≥ 2. One or two features per sample run the published computation on
            every backend (the fused ops' Gram route rounds the angles of so few dimensions: ±1 with one).
        w_dist, w_angle: the weights of the distance and angle terms, finite and ≥ 0 (RepDistiller: 25, 50).
    """
    w_dist = _checks.number("w_dist", w_dist, nonnegative=True)
    w_angle = _checks.number("w_angle", w_angle, nonnegative=True)
    _checks.pair_of("f_s", f_s, "f_t", f_t, min_ndim=2)
    _checks.min_batch("f_s", f_s, 2, "distances need two samples")
    f_s, f_t = _flat(f_s), _flat(f_t)
    return w_dist * ops.rkd_distance(f_s, f_t) + w_angle * ops.rkd_angle(f_s, f_t)


# --- PKT --------------------------------------------------------------------------------------

def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as RepDistiller's ``PKT``.

    With x̂ = x / (‖x‖ + eps) per row, S = (x̂x̂ᵀ + 1)/2 and P = S with each row divided by its sum::

        loss = mean over the B² entries of P_t · log((P_t + eps) / (P_s + eps))

    Args:
        f_s: student features ``[B, D_s]``.
        f_t: teacher features ``[B, D_t]`` (D_t may differ from D_s). D ≤ 2 runs the published
            computation on every backend: (1 + cos)/2 of (nearly) antiparallel pairs, common there, is of the
            order of eps, where the fused op's Gram-based gradient cancels.
        eps: the stabiliser ≥ 0 (RepDistiller: 1e-7).

    Returns:
        0-dim tensor; defined for B = 1 (then 0).
    """
    eps = _checks.number("eps", eps, nonnegative=True)
    _checks.pair_of("f_s", f_s, "f_t", f_t, ndim=2)
    return ops.pkt(f_s, f_t, eps)

"""Batch-relation losses: each network's batch becomes a B × B (or B × B × B) relation, and the
student's relations are pulled towards the teacher's.

Values match RepDistiller (SP, CC, RKD, PKT) and the CCKD paper (Peng et al. 2019); METHODS.md
gives each formula. Inputs in fp16 / bf16 are computed in fp32, and the loss comes back in fp32.
None of the math reads tensor values on the host; the only data-reading is the NaN / Inf check
of :mod:`fastkd._checks`, which ``fastkd.value_checks(False)`` turns off. An empty batch (B = 0,
where every mean is 0/0) raises ``ValueError`` naming the student's input, on every backend.

SP, CCKD, PKT and RKD's distance and angle terms run on the fused ops of :mod:`fastkd.ops.similarity`
(native C++ on CPU, Triton on CUDA) unless the ``torch`` backend is selected; the eager code below is
the published computation and that backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd import _checks
from fastkd.backends import choose_for
from fastkd._precision import upcast
from fastkd.ops import similarity as ops

__all__ = ["sp_loss", "cc_loss", "cckd_loss", "rkd_loss", "pkt_loss"]

# --- SP ---------------------------------------------------------------------------------------

def _sp_single(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    b = f_s.shape[0]
    g_s = F.normalize(_gram(f_s), dim=1)
    g_t = F.normalize(_gram(f_t), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


def _gram(f: torch.Tensor) -> torch.Tensor:
    q = upcast(f).reshape(f.shape[0], -1)
    return q @ q.T


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
    return sum(_sp_pair(s, t) for _, s, _, t in pairs)


def _sp_pair(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    if choose_for("sp_loss", f_s) == "torch":
        return _sp_single(f_s, f_t)
    return torch.ops.fastkd.sp_loss.default(_flat(f_s), _flat(f_t))[0]


def _flat(f: torch.Tensor) -> torch.Tensor:
    return f.reshape(f.shape[0], -1)


LEAST_FUSED_WIDTH = 3  # RKD and PKT with fewer features per sample run the published computation


def _fused(op: str, f_s: torch.Tensor, f_t: torch.Tensor) -> bool:
    """Whether ``op`` runs as the fused op here: not on the ``torch`` backend, and not where a side has fewer
    than LEAST_FUSED_WIDTH features per sample. With one or two features pairs of samples are (nearly) parallel,
    antiparallel or close together as a rule, where the fused ops' Gram route (distances and cosines from
    G = XXᵀ, RKD's angles by the law of cosines, gradients as M·X) rounds and the published computation, which
    forms the differences and normalises each row, does not: with one feature RKD's angles are exactly ±1; in the
    plane the Gram route's RKD angle gradients were measured 30-3,000× and PKT's 10× further from float64 than the
    published computation's (fp32, 8-33 samples). From 3 features on such pairs are the exception (RKD's angle
    term rounds each angle to ε·max‖x‖² / (‖x_j − x_i‖·‖x_k − x_i‖), see fastkd.ops.similarity): measured within
    the fuzz tests' bound but for one draw of 128 samples in 3 dimensions. The published computation is cheap at
    these widths."""
    return (choose_for(op, f_s) != "torch" and math.prod(f_s.shape[1:]) >= LEAST_FUSED_WIDTH
            and math.prod(f_t.shape[1:]) >= LEAST_FUSED_WIDTH)


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

def _taylor_rbf(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Σ_{p=0..P} e^{−2γ}(2γ)^p/p! · g^p with g = ê êᵀ, evaluated by Horner's rule from 0 (so that k is a
    function of g for every P: at P = 0, a constant with a zero gradient, as the fused op gives)."""
    unit = F.normalize(upcast(e), dim=1)
    g = unit @ unit.T
    coef = [math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(order + 1)]
    k = torch.zeros_like(g)
    for c in reversed(coef):
        k = k * g + c
    return k


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
    if choose_for("cckd_loss", e_s) != "torch":
        return torch.ops.fastkd.cckd_loss.default(e_s, e_t, gamma, order)[0]
    return (_taylor_rbf(e_s, gamma, order) - _taylor_rbf(e_t, gamma, order)).pow(2).mean()


# --- RKD --------------------------------------------------------------------------------------

def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``pdist``: sqrt(clamp(|e_i|² + |e_j|² − 2 e_i·e_j, min=1e-12)), diagonal 0."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.T)).clamp(min=1e-12).sqrt()
    diagonal = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(diagonal, 0.0)


def _normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """Distances divided by their mean over the entries > 0, without a boolean-mask gather."""
    d = _pairwise_distances(e)
    positive = (d > 0).to(d.dtype)
    return d / ((d * positive).sum() / positive.sum())


def _angles(e: torch.Tensor) -> torch.Tensor:
    """[i, j, k] = cosine between e_j − e_i and e_k − e_i (0 where a difference is 0)."""
    unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


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
    student = upcast(f_s).reshape(f_s.shape[0], -1)
    with torch.no_grad():
        teacher = upcast(f_t).reshape(f_t.shape[0], -1)
    return w_dist * _rkd_distance(f_s, f_t, student, teacher) + w_angle * _rkd_angle(f_s, f_t, student, teacher)


def _rkd_distance(f_s: torch.Tensor, f_t: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """smooth_l1(d_s / μ_s, d_t / μ_t) on the chosen backend (the fused op takes the inputs' dtype)."""
    if _fused("rkd_distance_loss", f_s, f_t):
        return torch.ops.fastkd.rkd_distance_loss.default(_flat(f_s), _flat(f_t).detach())[0]
    with torch.no_grad():
        d_t = _normalized_distances(teacher)
    return F.smooth_l1_loss(_normalized_distances(student), d_t)


def _rkd_angle(f_s: torch.Tensor, f_t: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """smooth_l1(a_s, a_t) on the chosen backend (the fused op takes the inputs' dtype and never forms the
    [B, B, D] differences; see fastkd.ops.similarity for how it treats (near-)duplicated rows)."""
    if _fused("rkd_angle_loss", f_s, f_t):
        return torch.ops.fastkd.rkd_angle_loss.default(_flat(f_s), _flat(f_t).detach())[0]
    with torch.no_grad():
        a_t = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), a_t)


# --- PKT --------------------------------------------------------------------------------------

def _cosine_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of (x̂x̂ᵀ + 1)/2, x̂ = x / (‖x‖ + eps), each divided by its sum."""
    x = upcast(x)
    unit = x / (x.norm(dim=1, keepdim=True) + eps)
    sim = (unit @ unit.T + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


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
    if _fused("pkt_loss", f_s, f_t):
        return torch.ops.fastkd.pkt_loss.default(f_s, f_t, eps)[0]
    p_s = _cosine_probabilities(f_s, eps)
    p_t = _cosine_probabilities(f_t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()

"""Batch-relation ops: SP, CCKD, PKT and RKD's distance and angle terms as functions of the Gram matrix.

Every one of these losses compares, for the student and the teacher, a B × B matrix built from the
batch X ([B, D], the features flattened per sample), and every such matrix is a function of the
Gram matrix G = XXᵀ alone (the diagonal holds the squared norms):

* SP (Tung & Mori, ICCV 2019): rownorm(G).
* CCKD (Peng et al., ICCV 2019): Σ_p e^{−2γ}(2γ)^p/p! · c^p with c_ij = G_ij / (ν_i ν_j), ν_i = max(√G_ii, 1e-12).
* PKT (Passalis & Tefas, ECCV 2018): (c + 1)/2 with ν_i = √G_ii + ε, rows divided by their sums.
* RKD's distance term (Park et al., CVPR 2019): d_ij = √max(G_ii + G_jj − 2G_ij, 1e-12), d_ii = 0,
  divided by its mean over the entries > 0.
* RKD's angle term: the B³ cosines a_ijk = (q_ij + q_ik − q_jk)/2 / (‖x_j − x_i‖ ‖x_k − x_i‖) with
  q_ij = G_ii + G_jj − 2G_ij (the law of cosines), an O(B³) epilogue over B × B inputs.

So each fused op is (1) the Gram matrices — the only O(B²D) work, a matrix product — and (2) an
epilogue over B × B entries that produces the loss and, in the same pass, the matrix
M = ∂L/∂G + (∂L/∂G)ᵀ. Since ∂L/∂X = M·X, backward is one B × B by B × D product per side and reads
nothing larger than M. One op per loss (rather than one generic op with a loss switch) keeps each
schema and fake implementation exact and lets each backend fuse its own epilogue.

Ops (namespace ``fastkd``), each returning ``(loss, m_s, m_t)`` (RKD: ``(loss, m_s)``; its teacher side
has no gradient); ``loss`` and the M's are fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64:

* ``sp_loss(Tensor f_s, Tensor f_t)``                    ‖rownorm(G_t) − rownorm(G_s)‖²_F / B²
* ``cckd_loss(Tensor e_s, Tensor e_t, float gamma, int order)``   mean (k(c_s) − k(c_t))²
* ``pkt_loss(Tensor f_s, Tensor f_t, float eps)``         mean P_t log((P_t + ε)/(P_s + ε))
* ``rkd_distance_loss(Tensor f_s, Tensor f_t)``           mean smooth-L1(d_s/μ_s − d_t/μ_t), β = 1
* ``rkd_angle_loss(Tensor f_s, Tensor f_t)``              mean over B³ of smooth-L1(a_s − a_t), β = 1

Inputs are [B, D] (the callers flatten), D may differ between student and teacher. The readable
contract of each op is its ``*_with_grad_reference`` below: the default kernel, the oracle of the
native and Triton kernels. The published computations (eager torch, differentiated by autograd:
:func:`sp_reference` ... :func:`rkd_angle_reference`) are the ``torch`` backend; :func:`sp`, :func:`cckd`,
:func:`pkt`, :func:`rkd_distance` and :func:`rkd_angle` run one loss on the backend the table picks. The
backward of every op is one product per side, ∂L/∂X = grad·M·X: the op ``fastkd::relation_grad`` (a backend
binds :func:`relation_autograd` to its own product op).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd._precision import accumulation_dtype, upcast
from fastkd.backends import kernel_for
from fastkd.ops._library import Autograd, define

ROWNORM_EPS = 1e-12   # F.normalize's eps (SP's row norms, CCKD's embedding norms)
RKD_DIST_EPS = 1e-12  # RepDistiller's clamp of the squared distances


def gram(x: torch.Tensor) -> torch.Tensor:
    """G = XXᵀ of [B, D] X, accumulated in fp32 (fp64 for fp64 X)."""
    q = upcast(x)
    return q @ q.T


# --- the epilogues' building blocks: a loss's gradient through each transformation of G ---------

def rownorm_backward(y: torch.Tensor, norm: torch.Tensor, grad_y: torch.Tensor, eps: float) -> torch.Tensor:
    """∂L/∂g for y = g / max(‖g_i‖, eps) row by row (the last dimension), given y, the row norms [..., B, 1] and
    ∂L/∂y (a batch of matrices too: IUSP's)."""
    clamped = norm.clamp_min(eps)
    projected = grad_y - y * (y * grad_y).sum(-1, keepdim=True)
    return torch.where(norm >= eps, projected, grad_y) / clamped


def cosine_backward(g: torch.Tensor, c: torch.Tensor, nu: torch.Tensor, dnu: torch.Tensor,
                    grad_c: torch.Tensor) -> torch.Tensor:
    """∂L/∂G for c_ij = G_ij / (ν_i ν_j), ν_i a function of G_ii with derivative ``dnu`` (= dν_i/dG_ii)."""
    grad_g = grad_c / (nu.unsqueeze(1) * nu.unsqueeze(0))
    weighted = grad_c * c
    grad_nu = -(weighted.sum(1) + weighted.sum(0)) / nu
    return grad_g + torch.diag(grad_nu * dnu)


def symmetrized(grad_g: torch.Tensor) -> torch.Tensor:
    """M = ∂L/∂G + (∂L/∂G)ᵀ, so that ∂L/∂X = M·X for G = XXᵀ (of each matrix of a batch [..., B, B])."""
    return grad_g + grad_g.transpose(-1, -2)


def _norms(g: torch.Tensor) -> torch.Tensor:
    return g.diagonal().clamp_min(0).sqrt()


# --- SP ---------------------------------------------------------------------------------------

def sp_with_grad_reference(f_s: torch.Tensor, f_t: torch.Tensor):
    """``fastkd::sp_loss``: (‖rownorm(G_s) − rownorm(G_t)‖²_F / B², M_s, M_t)."""
    b = f_s.shape[0]
    g_s, g_t = gram(f_s), gram(f_t)
    n_s, n_t = g_s.norm(dim=1, keepdim=True), g_t.norm(dim=1, keepdim=True)
    y_s, y_t = g_s / n_s.clamp_min(ROWNORM_EPS), g_t / n_t.clamp_min(ROWNORM_EPS)
    diff = y_s - y_t
    loss = diff.pow(2).sum() / (b * b)
    grad_y = diff * (2.0 / (b * b))
    m_s = symmetrized(rownorm_backward(y_s, n_s, grad_y, ROWNORM_EPS))
    m_t = symmetrized(rownorm_backward(y_t, n_t, -grad_y, ROWNORM_EPS))
    return loss, m_s, m_t


# --- CCKD -------------------------------------------------------------------------------------

def taylor_coefficients(gamma: float, order: int) -> list[float]:
    """c_p = e^{−2γ}(2γ)^p / p!, p = 0..P."""
    return [math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(order + 1)]


def _cckd_side(f: torch.Tensor, coef: list[float]):
    """(k(c), k'(c), c, ν, dν/dG_ii) of one side, k by Horner's rule."""
    g = gram(f)
    n = _norms(g)
    nu = n.clamp_min(ROWNORM_EPS)
    c = g / (nu.unsqueeze(1) * nu.unsqueeze(0))
    k = torch.full_like(c, coef[-1])
    dk = torch.full_like(c, coef[-1] * (len(coef) - 1))
    for p in range(len(coef) - 2, -1, -1):
        k = k * c + coef[p]
        if p >= 1:
            dk = dk * c + coef[p] * p
    if len(coef) == 1:
        dk = torch.zeros_like(c)
    dnu = torch.where(n >= ROWNORM_EPS, 0.5 / n.clamp_min(ROWNORM_EPS), torch.zeros_like(n))
    return g, k, dk, c, nu, dnu


def cckd_with_grad_reference(e_s: torch.Tensor, e_t: torch.Tensor, gamma: float, order: int):
    """``fastkd::cckd_loss``: (mean over B² of (k(c_s) − k(c_t))², M_s, M_t)."""
    b = e_s.shape[0]
    coef = taylor_coefficients(gamma, order)
    g_s, k_s, dk_s, c_s, nu_s, dnu_s = _cckd_side(e_s, coef)
    g_t, k_t, dk_t, c_t, nu_t, dnu_t = _cckd_side(e_t, coef)
    diff = k_s - k_t
    loss = diff.pow(2).sum() / (b * b)
    grad_k = diff * (2.0 / (b * b))
    m_s = symmetrized(cosine_backward(g_s, c_s, nu_s, dnu_s, grad_k * dk_s))
    m_t = symmetrized(cosine_backward(g_t, c_t, nu_t, dnu_t, -grad_k * dk_t))
    return loss, m_s, m_t


# --- PKT --------------------------------------------------------------------------------------

def _pkt_side(f: torch.Tensor, eps: float):
    g = gram(f)
    n = _norms(g)
    nu = n + eps
    c = g / (nu.unsqueeze(1) * nu.unsqueeze(0))
    s = (c + 1.0) / 2.0
    total = s.sum(1, keepdim=True)
    # x.norm()'s gradient is 0 at a zero row: so is ν's here
    dnu = torch.where(n > 0, 0.5 / n.clamp_min(torch.finfo(n.dtype).tiny), torch.zeros_like(n))
    return g, c, nu, dnu, s / total, total


def _pkt_grad(g, c, nu, dnu, p, total, grad_p):
    grad_s = (grad_p - (grad_p * p).sum(1, keepdim=True)) / total
    return symmetrized(cosine_backward(g, c, nu, dnu, grad_s / 2.0))


def pkt_with_grad_reference(f_s: torch.Tensor, f_t: torch.Tensor, eps: float):
    """``fastkd::pkt_loss``: (mean over B² of P_t log((P_t + ε)/(P_s + ε)), M_s, M_t)."""
    b = f_s.shape[0]
    g_s, c_s, nu_s, dnu_s, p_s, tot_s = _pkt_side(f_s, eps)
    g_t, c_t, nu_t, dnu_t, p_t, tot_t = _pkt_side(f_t, eps)
    log_ratio = torch.log((p_t + eps) / (p_s + eps))
    loss = (p_t * log_ratio).sum() / (b * b)
    grad_p_s = -p_t / (p_s + eps) / (b * b)
    grad_p_t = (log_ratio + p_t / (p_t + eps)) / (b * b)
    return loss, _pkt_grad(g_s, c_s, nu_s, dnu_s, p_s, tot_s, grad_p_s), \
        _pkt_grad(g_t, c_t, nu_t, dnu_t, p_t, tot_t, grad_p_t)


# --- RKD distance term ------------------------------------------------------------------------

def _rkd_distances(f: torch.Tensor):
    """(d / μ, d, the squared distances before the clamp, μ, the count of d > 0)."""
    g = gram(f)
    sq = g.diagonal()
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * g
    off = ~torch.eye(g.shape[0], dtype=torch.bool, device=g.device)
    d = torch.where(off, d2.clamp_min(RKD_DIST_EPS).sqrt(), torch.zeros_like(d2))
    positive = (d > 0).to(d.dtype)
    count = positive.sum()
    mu = (d * positive).sum() / count
    return d / mu, d, d2, mu, count, positive, off


def rkd_distance_with_grad_reference(f_s: torch.Tensor, f_t: torch.Tensor):
    """``fastkd::rkd_distance_loss``: (mean over B² of smooth-L1(d_s/μ_s − d_t/μ_t), M_s)."""
    b = f_s.shape[0]
    dn_s, d, d2, mu, count, positive, off = _rkd_distances(f_s)
    dn_t = _rkd_distances(f_t)[0]
    x = dn_s - dn_t
    loss = torch.where(x.abs() < 1, 0.5 * x * x, x.abs() - 0.5).sum() / (b * b)
    grad_dn = x.clamp(-1.0, 1.0) / (b * b)
    grad_d = grad_dn / mu - (grad_dn * d).sum() / (mu * mu) * positive / count
    passes = off & (d2 >= RKD_DIST_EPS)
    v = torch.where(passes, grad_d / (2 * d.clamp_min(RKD_DIST_EPS)), torch.zeros_like(d))
    grad_g = -2 * v + torch.diag(v.sum(1) + v.sum(0))
    return loss, symmetrized(grad_g)


# --- RKD angle term ---------------------------------------------------------------------------
#
# For anchor i, a_ijk = <e_ij, e_ik> with e_ij = (x_j − x_i) / max(‖x_j − x_i‖, 1e-12) (F.normalize). With the
# squared distances q_ij = G_ii + G_jj − 2G_ij (law of cosines: <x_j − x_i, x_k − x_i> = (q_ij + q_ik − q_jk)/2):
#
#     a_ijk = (q_ij + q_ik − q_jk)/2 · r_ij r_ik,   r_ij = 1 / max(√q_ij, 1e-12),
#
# so every angle is a function of the B × B matrix q: no [B, B, D] differences. Near-duplicate rows: q from the
# Gram expansion carries a rounding error of order ε(G_ii + G_jj) (ε the accumulation dtype's machine epsilon),
# so an exactly duplicated row gives q_ij of rounding size, not 0, and 1/√q_ij would turn that noise into
# angles of any value. A pair with q_ij ≤ RKD_ANGLE_ZERO_TOL·ε·(G_ii + G_jj) (and every i = j) is therefore a
# zero difference: q_ij = 0, r_ij = 0, its angles 0 (what F.normalize gives an exactly zero difference) and no
# gradient through it. That zeroes pairs whose distance is below √(2·32ε) ≈ 3e-3 (fp32) or 1.2e-7 (fp64) of
# the rows' norms, where the Gram expansion could not resolve their angles anyway (error ~ε‖x‖²/q ≳ 1/64);
# elsewhere an angle's absolute error is of order ε·max(G_ii, G_jj, G_kk)/(√q_ij √q_ik). The published autograd
# at an exact duplicate differentiates through F.normalize's clamp (a gradient scaled by 1/1e-12); here that
# pair contributes none.
#
# Gradient: with g_ijk = clamp(a^s_ijk − a^t_ijk, ±1)/B³ and ρ_ij = r_ij² where the clamp passes (√q_ij ≥ 1e-12,
# else 0), the gradient with respect to the entry q_ij (i ≠ j, not zeroed) is
#
#     U_ij = r_ij Σ_k g_ijk r_ik − ρ_ij Σ_k g_ijk a^s_ijk     (q_ij in the anchor's own pairs (i, j, ·), (i, ·, j))
#          − ½ Σ_m g_mij r_mi r_mj                            (q_ij as the far side of anchor m's triangle),
#
# and since q_ij = G_ii + G_jj − 2G_ij: ∂L/∂G = −2U + diag(ΣU_i· + ΣU_·i), M = ∂L/∂G + (∂L/∂G)ᵀ.

RKD_ANGLE_EPS = 1e-12    # F.normalize's eps on the difference norms
RKD_ANGLE_ZERO_TOL = 32  # a squared distance ≤ 32·ε·(G_ii + G_jj) is a zero difference


def _rkd_angle_pairs(f: torch.Tensor):
    """(q, r, ρ) of one side: the squared distances (0 on the zeroed pairs), r = 1/max(√q, eps) (0 there), and
    ρ = r² where the eps clamp passes (0 elsewhere)."""
    g = gram(f)
    sq = g.diagonal()
    both = sq.unsqueeze(1) + sq.unsqueeze(0)
    q = both - 2 * g
    eye = torch.eye(g.shape[0], dtype=torch.bool, device=g.device)
    zero = eye | (q <= RKD_ANGLE_ZERO_TOL * torch.finfo(g.dtype).eps * both)
    q = torch.where(zero, torch.zeros_like(q), q)
    n = q.clamp_min(0).sqrt()
    r = torch.where(zero, torch.zeros_like(q), 1 / n.clamp_min(RKD_ANGLE_EPS))
    rho = torch.where(n >= RKD_ANGLE_EPS, r * r, torch.zeros_like(r))
    return q, r, rho


def _rkd_angles(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """[i, j, k] = (q_ij + q_ik − q_jk)/2 · r_ij r_ik (a B³ tensor: the readable form)."""
    return (q.unsqueeze(2) + q.unsqueeze(1) - q.unsqueeze(0)) / 2 * r.unsqueeze(2) * r.unsqueeze(1)


def rkd_angle_with_grad_reference(f_s: torch.Tensor, f_t: torch.Tensor):
    """``fastkd::rkd_angle_loss``: (mean over B³ of smooth-L1(a_s − a_t), M_s), the angles a_ijk as above."""
    b = f_s.shape[0]
    q_s, r_s, rho_s = _rkd_angle_pairs(f_s)
    a_s = _rkd_angles(q_s, r_s)
    a_t = _rkd_angles(*_rkd_angle_pairs(f_t)[:2])
    x = a_s - a_t
    loss = torch.where(x.abs() < 1, 0.5 * x * x, x.abs() - 0.5).sum() / b**3
    g = x.clamp(-1.0, 1.0) / b**3
    u = r_s * (g * r_s.unsqueeze(1)).sum(2) - rho_s * (g * a_s).sum(2)
    far = (g * r_s.unsqueeze(2) * r_s.unsqueeze(1)).sum(0) / 2
    u = u - torch.where(r_s != 0, far, torch.zeros_like(far))
    grad_g = -2 * u + torch.diag(u.sum(1) + u.sum(0))
    return loss, symmetrized(grad_g)


# --- the published computations (the torch backend; RepDistiller's code, the CCKD paper's form) ------

def sp_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """‖F.normalize(G_t) − F.normalize(G_s)‖²_F / B² on [B, D] inputs: RepDistiller's ``Similarity``."""
    b = f_s.shape[0]
    return (F.normalize(gram(f_t), dim=1) - F.normalize(gram(f_s), dim=1)).pow(2).sum() / (b * b)


def taylor_rbf(e: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Σ_{p=0..P} c_p · g^p with g = ê êᵀ, evaluated by Horner's rule from 0 (so that k is a function of g for
    every P: at P = 0, a constant with a zero gradient, as the fused op gives)."""
    unit = F.normalize(upcast(e), dim=1)
    g = unit @ unit.T
    k = torch.zeros_like(g)
    for c in reversed(taylor_coefficients(gamma, order)):
        k = k * g + c
    return k


def cckd_reference(e_s: torch.Tensor, e_t: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """mean over the B² entries of (k(g_s) − k(g_t))²: the CCKD paper's kernel form."""
    return (taylor_rbf(e_s, gamma, order) - taylor_rbf(e_t, gamma, order)).pow(2).mean()


def cosine_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of (x̂x̂ᵀ + 1)/2, x̂ = x / (‖x‖ + eps), each divided by its sum."""
    x = upcast(x)
    unit = x / (x.norm(dim=1, keepdim=True) + eps)
    sim = (unit @ unit.T + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_reference(f_s: torch.Tensor, f_t: torch.Tensor, eps: float) -> torch.Tensor:
    """mean over the B² entries of P_t · log((P_t + eps) / (P_s + eps)): RepDistiller's ``PKT``."""
    p_s, p_t = cosine_probabilities(f_s, eps), cosine_probabilities(f_t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``pdist``: sqrt(clamp(|e_i|² + |e_j|² − 2 e_i·e_j, min=1e-12)), diagonal 0."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.T)).clamp(min=RKD_DIST_EPS).sqrt()
    diagonal = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(diagonal, 0.0)


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """Distances divided by their mean over the entries > 0, without a boolean-mask gather (a host sync)."""
    d = pairwise_distances(e)
    positive = (d > 0).to(d.dtype)
    return d / ((d * positive).sum() / positive.sum())


def angles(e: torch.Tensor) -> torch.Tensor:
    """[i, j, k] = cosine between e_j − e_i and e_k − e_i (0 where a difference is 0)."""
    unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_distance_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """smooth_l1(d_s / μ_s, d_t / μ_t) on [B, D] inputs (in the accumulation dtype), no gradient to the teacher."""
    with torch.no_grad():
        d_t = normalized_distances(upcast(f_t))
    return F.smooth_l1_loss(normalized_distances(upcast(f_s)), d_t)


def rkd_angle_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """smooth_l1(a_s, a_t) over the B³ angles, no gradient to the teacher."""
    with torch.no_grad():
        a_t = angles(upcast(f_t))
    return F.smooth_l1_loss(angles(upcast(f_s)), a_t)


# --- the ops ----------------------------------------------------------------------------------

def relation_grad_reference(x: torch.Tensor, m: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``fastkd::relation_grad``: ∂L/∂X = grad_loss · M·X, in X's dtype (the product accumulated in M's dtype);
    [B, D] X with [B, B] M, or a batch of them ([N, T, D] X with [N, T, T] M: IUSP's sequences)."""
    return ((m * grad_loss.to(m.dtype)) @ x.to(m.dtype)).to(x.dtype)


RELATION_GRAD = define("relation_grad(Tensor x, Tensor m, Tensor grad_loss) -> Tensor", relation_grad_reference,
                       lambda x, m, grad_loss: x.new_empty(x.shape))


def relation_autograd(relation_grad: torch._ops.OpOverload) -> Autograd:
    """The relation ops' autograd formula for a backend whose M·X product is the op ``relation_grad``: the M's
    of the forward pass are saved with the inputs, and ∂L/∂X = grad·M·X for each input that needs it."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], *output[1:])

    def backward(ctx, grad_loss, *unused):
        f_s, f_t, *ms = ctx.saved_tensors
        grads = [relation_grad(x, m, grad_loss) if ctx.needs_input_grad[i] else None
                 for i, (x, m) in enumerate(zip((f_s, f_t), ms))]
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))

    return Autograd(setup_context, backward)


AUTOGRAD = relation_autograd(RELATION_GRAD)


def _fake(f_s, f_t, *args):
    b, acc = f_s.shape[0], accumulation_dtype(f_s)
    return f_s.new_empty((), dtype=acc), f_s.new_empty((b, b), dtype=acc), f_s.new_empty((b, b), dtype=acc)


def _fake_rkd(f_s, f_t):
    return _fake(f_s, f_t)[:2]


_OUT3 = "(Tensor, Tensor, Tensor)"
SP = define(f"sp_loss(Tensor f_s, Tensor f_t) -> {_OUT3}", sp_with_grad_reference, _fake, AUTOGRAD)
CCKD = define(f"cckd_loss(Tensor e_s, Tensor e_t, float gamma, int order) -> {_OUT3}", cckd_with_grad_reference,
              _fake, AUTOGRAD)
PKT = define(f"pkt_loss(Tensor f_s, Tensor f_t, float eps) -> {_OUT3}", pkt_with_grad_reference, _fake, AUTOGRAD)
RKD_DISTANCE = define("rkd_distance_loss(Tensor f_s, Tensor f_t) -> (Tensor, Tensor)",
                      rkd_distance_with_grad_reference, _fake_rkd, AUTOGRAD)
RKD_ANGLE = define("rkd_angle_loss(Tensor f_s, Tensor f_t) -> (Tensor, Tensor)", rkd_angle_with_grad_reference,
                   _fake_rkd, AUTOGRAD)
REFERENCES = {
    "sp_loss": sp_with_grad_reference,
    "cckd_loss": cckd_with_grad_reference,
    "pkt_loss": pkt_with_grad_reference,
    "rkd_distance_loss": rkd_distance_with_grad_reference,
    "rkd_angle_loss": rkd_angle_with_grad_reference,
}


# --- the losses on the chosen backend ------------------------------------------------------------

LEAST_FUSED_WIDTH = 3  # RKD and PKT with fewer features per sample run the published computation


def _fused_op(name: str, f_s: torch.Tensor, f_t: torch.Tensor) -> torch._ops.OpOverload | None:
    """The op that runs ``name`` on [B, D] inputs, or None for the published computation: on the ``torch``
    backend, and where a side has fewer than LEAST_FUSED_WIDTH features per sample. With one or two features
    pairs of samples are (nearly) parallel, antiparallel or close together as a rule, where the fused ops' Gram
    route (distances and cosines from G = XXᵀ, RKD's angles by the law of cosines, gradients as M·X) rounds and
    the published computation, which forms the differences and normalises each row, does not: with one feature
    RKD's angles are exactly ±1; in the plane the Gram route's RKD angle gradients were measured 30-3,000× and
    PKT's 10× further from float64 than the published computation's (fp32, 8-33 samples). From 3 features on
    such pairs are the exception (RKD's angle term rounds each angle to ε·max‖x‖² / (‖x_j − x_i‖·‖x_k − x_i‖),
    see the angle section above): measured within the fuzz tests' bound but for one draw of 128 samples in 3
    dimensions. The published computation is cheap at these widths."""
    if f_s.shape[1] < LEAST_FUSED_WIDTH or f_t.shape[1] < LEAST_FUSED_WIDTH:
        return None
    return kernel_for(name, f_s)


def sp(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """SP of [B, D] inputs on the chosen backend."""
    op = kernel_for("sp_loss", f_s)
    return sp_reference(f_s, f_t) if op is None else op(f_s, f_t)[0]


def cckd(e_s: torch.Tensor, e_t: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """CCKD of [B, D] embeddings on the chosen backend."""
    op = kernel_for("cckd_loss", e_s)
    return cckd_reference(e_s, e_t, gamma, order) if op is None else op(e_s, e_t, gamma, order)[0]


def pkt(f_s: torch.Tensor, f_t: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT of [B, D] inputs on the chosen backend (the published computation below LEAST_FUSED_WIDTH features)."""
    op = _fused_op("pkt_loss", f_s, f_t)
    return pkt_reference(f_s, f_t, eps) if op is None else op(f_s, f_t, eps)[0]


def rkd_distance(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD's distance term of [B, D] inputs on the chosen backend; no gradient reaches the teacher."""
    op = _fused_op("rkd_distance_loss", f_s, f_t)
    return rkd_distance_reference(f_s, f_t) if op is None else op(f_s, f_t.detach())[0]


def rkd_angle(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD's angle term of [B, D] inputs on the chosen backend (the fused op never forms the [B, B, D]
    differences; see the angle section for (near-)duplicated rows); no gradient reaches the teacher."""
    op = _fused_op("rkd_angle_loss", f_s, f_t)
    return rkd_angle_reference(f_s, f_t) if op is None else op(f_s, f_t.detach())[0]

"""The logit losses as fused ops: ``fastkd::kd_loss`` and ``fastkd::dkd_loss``.

KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015 (RepDistiller's
``DistillKL``). DKD: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022
(mdistiller's ``dkd_loss``).

Two kinds of torch code live here:

* :func:`kd_reference` and :func:`dkd_reference` are the published computations (log-softmax of
  z/T, the KL summed over classes, the mean over the batch), differentiated by autograd: the
  yardstick of the tests ("plain PyTorch"), whose rounding at the edges the contract avoids.
* :func:`kd_forward_reference`, :func:`kd_backward_reference` and their DKD twins are the
  contract that the native and Triton kernels implement: the forward pass returns the loss and a
  few statistics per row; the backward pass recomputes the gradient of the logits from the logits
  and those statistics, so no B×C softmax is kept between the passes. The two, as an autograd Function,
  are the ``torch`` backend. :func:`kd_with_grad_reference`
  (``fastkd::kd_loss_with_grad``) is KD's forward pass that also returns the student's gradient: on
  CPU, where a step is bound by the exponentials, kd_loss's autograd runs it when only the student
  needs a gradient (one B×C gradient kept, half the exponentials).

The formulas (the comment above the contract's section below derives them), with z = x / T in fp32 at
least, p = softmax(z), u the upstream gradient and k = u·T/B:

KD   loss = T²/B Σ_b KL(p_t ‖ p_s) = T²/B Σ_b Σ_c p_t ψ(w_c), ψ(w) = e^{−w} − 1 + w, w = log p_t − log p_s;
     d loss/d x_s = k (p_s − p_t),  d loss/d x_t = k p_t (w − KL_b).

DKD  with g the target, q = softmax over the classes c ≠ g, λ = z_g − lse(z_{c≠g}) the target's log-odds,
     b = (σ(λ), σ(−λ)), b̂ = (σ(λ − 1000), σ(−λ + 1000)) (mdistiller's −1000 on the target):
     loss = T²/B Σ_b (α TCKD_b + β NCKD_b),  TCKD = KL(b_t ‖ b_s),  NCKD = r_t KL(q_t ‖ q_s) + KL(b̂_t ‖ b̂_s)
     (r = b̂_2, the mass of the non-target classes; the chain rule of KL over {g} ∪ {the rest}); the
     gradients in the contract section.

Edges: both losses are accurate to their dtype's rounding where the published computation is not: at
T ≥ 1e3 (where it turns negative), a student within 1e-3 of its teacher, logits of 1e4 or any common
offset (log-ratios against each row's own maximum), and one-hot rows; the teacher's gradient stays finite
at logits of 1e4 in fp16. Zero classes are refused by :func:`fastkd.functional.kd_loss`.

The loss is float32 for fp16 / bf16 logits (the policy of :mod:`fastkd.functional.logits`), the
gradients have the logits' dtype. Gradients reach both the student and the teacher logits (the
teacher's only when it requires them: its pass is skipped otherwise).

The autograd formula is registered here for every device (:func:`kd_autograd`, :func:`dkd_autograd`: a
backend's forward ops bind it to that backend's backward ops); the native library
registers the same one in C++ for CPU tensors (dispatch key AutogradCPU, csrc/cpu/logits_autograd.cpp), which
spares a CPU step torch.library's Python wrapper: measured on 64 × 100 logits, +25 µs on a 44 µs KD step
(+57%) and on a 68 µs DKD step (+38%).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd._precision import accumulation_dtype, upcast
from fastkd.backends import kernel_for
from fastkd.ops._library import Autograd, define

# mdistiller removes the target class from the NCKD softmax by subtracting 1000 from its z/T.
TARGET_SHIFT = 1000.0


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T, in float32 at least."""
    return upcast(logits) / temperature


# ---------------------------------------------------------------- the published computations


def _kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over every entry, with p = exp(log p): KL(p ‖ q) summed over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum()


def kd_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · (1/B) Σ_b Σ_c p_t (log p_t − log p_s), p = softmax(x / T): RepDistiller's ``DistillKL``."""
    log_p_s = F.log_softmax(_scaled(logits_s, temperature), dim=1)
    log_p_t = F.log_softmax(_scaled(logits_t, temperature), dim=1)
    return _kl_sum(log_p_t, log_p_s) * temperature**2 / logits_s.shape[0]


def _binary_log_probs(z: torch.Tensor, target: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """[log p_gt, log(1 − p_gt)] per row, [B, 2], through log-sum-exp (never log of a rounded 1 − p).

    log p_gt = z_gt − lse(z);  log(1 − p_gt) = lse(z over the non-target classes) − lse(z).
    """
    lse_all = z.logsumexp(dim=1)
    lse_other = z.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
    z_gt = z.gather(1, target.unsqueeze(1)).squeeze(1)
    return torch.stack([z_gt - lse_all, lse_other - lse_all], dim=1)


def _non_target_log_probs(z: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """log softmax(z − 1000·onehot(gt)): mdistiller's distribution over the non-target classes."""
    return F.log_softmax(z - TARGET_SHIFT * is_target, dim=1)


def dkd_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                  temperature: float) -> torch.Tensor:
    """α·T²/B Σ_b KL(b_t ‖ b_s) + β·T²/B Σ_b KL(p̂_t ‖ p̂_s): mdistiller's ``dkd_loss``, log b through
    log-sum-exp (b = [p_gt, 1 − p_gt], p̂ = softmax(z/T − 1000·onehot(gt)))."""
    z_s, z_t = _scaled(logits_s, temperature), _scaled(logits_t, temperature)
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter(1, target.unsqueeze(1), True)
    tckd = _kl_sum(_binary_log_probs(z_t, target, is_target), _binary_log_probs(z_s, target, is_target))
    nckd = _kl_sum(_non_target_log_probs(z_t, is_target), _non_target_log_probs(z_s, is_target))
    scale = temperature**2 / logits_s.shape[0]
    return alpha * tckd * scale + beta * nckd * scale


# ---------------------------------------------------------------- the contract of the fused ops
#
# Both losses are sums of KL divergences between two softmaxes, each a second-order quantity in the
# log-ratios w_c = log p_t,c − log p_s,c, so Σ p_t w (the published form) cancels its first-order parts:
# its error is ε·|log p| against a value of order Var(w), and at T ≥ 1e3 or a student within 1e-3 of its
# teacher it is mostly rounding (negative at T = 1e6). The contract computes instead
#
#     KL = Σ_c p_t,c ψ(w_c),   ψ(w) = e^{−w} − 1 + w ≥ 0
#
# (Σ p_t e^{−w} = Σ p_s = 1 makes the two forms equal), a sum of non-negative terms, each accurate to its
# dtype's rounding: ψ comes from its Taylor series for |w| < 1 (_psi_near_zero) and p_t ψ(w) = p_s − p_t + p_t w
# elsewhere (kl_term). The log-ratios come from the logits and three numbers per row, the two rows' largest
# logits M and ρ = ℓ_t − ℓ_s, ℓ = log Σ exp((x − M)/T) (log_ratio): w = (x_t − x_s)/T − Δ with
# Δ = (M_t − M_s)/T + ρ = lse(z_t) − lse(z_s) where the maxima are close (the logits' difference then rounds
# relative to itself), each logit against its own row's maximum where they are not. ρ₀ computed from the two
# sums carries an error η of the order of their rounding, and the sum above is stationary in ρ: with w₀ from
# ρ₀ it is KL + P·(e^η − 1 − η), P = Σ p_t. One Newton step recovers both: with h = Σ p_t (e^{−w₀} − 1) / P
# (= e^η − 1) and y = log1p(h),
#
#     KL = Σ p_t ψ(w₀) − P·ψ(−y),   ρ = ρ₀ − y,
#
# the difference of two non-negative terms whose exact value is ≥ 0 (the minimum over ρ of a sum of
# non-negative terms), so a negative result is rounding and is clamped to 0. (The native kernels take the
# plain Σ p_t w₀ in a row whose KL is at least 1/4, where its rounding is below 16ε·KL, and this sum elsewhere.)
# Every exponential has its row's largest logit subtracted before the division by T, as log_softmax does.
# Gradients come from the same log-ratios: p_s − p_t = p_t (e^{−w} − 1) (prob_difference) without cancellation
# where p_s ≈ p_t.
#
# KD   stats [B, 5] = (M_t, ℓ_t, KL_b, ρ, M_s), M in logit units (exact); loss = T²/B Σ_b KL_b;
#      log p_t = (x_t − M_t)/T − ℓ_t, log p_s = (x_s − M_s)/T − (ℓ_t − ρ), w = log_ratio(...);
#      d loss/d x_s = u·T/B·(p_s − p_t),  d loss/d x_t = u·T/B·p_t (w − KL_b).
#
# DKD  the same over the non-target classes (q = softmax over c ≠ g): stats [B, 7] = (M_t, ℓ_t, TCKD_b,
#      NCKD_b, ρ, M_s, K_b) with M, ℓ, ρ of those classes and K_b = KL(q_t ‖ q_s). With λ = z_g − O the log-odds
#      of the target (O = lse over c ≠ g; λ_t = (x_t,g − M_t)/T − ℓ_t) and δ = λ_t − λ_s, the target column's
#      log-ratio:
#        b = (σ(λ), σ(−λ)),  TCKD = KL(b_t ‖ b_s),
#        b̂ = (ĝ, r) = (σ(λ̂), σ(−λ̂)) with λ̂ = λ − 1000 (mdistiller's mask),  NCKD = r_t K + KL(b̂_t ‖ b̂_s)
#      (the chain rule of KL over {target} ∪ {the rest}), the binary log-ratios from softplus differences
#      (softplus_difference). With k = u·T/B,
#        A = α (b_s,gt − b_t,gt) + β (ĝ_s − ĝ_t),
#        G = α b_t,gt b_t,o (w_gt − w_o) + β ĝ_t r_t (ŵ_gt − ŵ_o − K)     (∂ loss_b/∂λ_t),
#        d/d x_s,g = k A,   d/d x_s,c = k [β r_t (q_s,c − q_t,c) − q_s,c A],
#        d/d x_t,g = k G,   d/d x_t,c = k q_t,c [β r_t (w_c − K) − G].

PSI_RADIUS = 1.0  # |w| below which ψ(w) comes from its Taylor series
FAR_MAXIMA = 8.0  # |M_t − M_s|/T above which log-ratios are taken against each row's own maximum


def _psi_near_zero(w: torch.Tensor) -> torch.Tensor:
    """ψ(w) = e^{−w} − 1 + w = w² Σ_{n≥0} (−w)^n / (n + 2)! for |w| ≤ 1, by Horner's rule on the first 10
    terms (fp32: truncation < 1/(12!·ψ(1)) = 6e-9 relative) or 17 (fp64: < 2e-17)."""
    terms = 17 if w.dtype == torch.float64 else 10
    u = -w
    total = torch.full_like(w, 1.0 / math.factorial(terms + 1))
    for n in range(terms - 2, -1, -1):
        total = total * u + 1.0 / math.factorial(n + 2)
    return w * w * total


def psi(w: torch.Tensor) -> torch.Tensor:
    """ψ(w) = e^{−w} − 1 + w ≥ 0, accurate to rounding for every w (the series near 0)."""
    near = w.abs() < PSI_RADIUS
    return torch.where(near, _psi_near_zero(w.clamp(-PSI_RADIUS, PSI_RADIUS)), torch.expm1(-w) + w)


def kl_term(p_t: torch.Tensor, p_s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """p_t (log p_t − log p_s) + p_s − p_t = p_t ψ(w), w = log p_t − log p_s: a KL term plus a term whose
    sum over a distribution's support is 0, ≥ 0 and without cancellation (the series for |w| < 1)."""
    near = w.abs() < PSI_RADIUS
    return torch.where(near, p_t * _psi_near_zero(w.clamp(-PSI_RADIUS, PSI_RADIUS)), p_s - p_t + p_t * w)


def prob_difference(p_t: torch.Tensor, p_s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """p_s − p_t = p_t (e^{−w} − 1), w = log p_t − log p_s: relative accuracy where p_s ≈ p_t (the series)."""
    near = w.abs() < PSI_RADIUS
    w_near = w.clamp(-PSI_RADIUS, PSI_RADIUS)
    return torch.where(near, p_t * (_psi_near_zero(w_near) - w_near), p_s - p_t)


def _row_parts(x: torch.Tensor, temperature: float, skip: torch.Tensor | None):
    """(M, ℓ, log p) of each row of z = x / T over the columns not in ``skip``: M the row's largest logit
    (logit units), ℓ = log Σ exp((x − M)/T), log p = (x − M)/T − ℓ (−inf at skipped columns). M is detached:
    nothing depends on it but the rounding."""
    if skip is not None:
        x = x.masked_fill(skip, float("-inf"))
    top = x.amax(dim=1, keepdim=True).detach()
    shifted = (x - top) / temperature
    ell = shifted.logsumexp(dim=1, keepdim=True)
    return top, ell, shifted - ell


def log_ratio(x_s: torch.Tensor, x_t: torch.Tensor, top_s: torch.Tensor, top_t: torch.Tensor, rho: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """w = log p_t − log p_s of every column from each row's maxima M and ρ = ℓ_t − ℓ_s: (x_t − x_s)/T − Δ
    with Δ = (M_t − M_s)/T + ρ where the maxima are within FAR_MAXIMA·T (the difference of the logits is then
    exact to its own rounding), else ((x_t − M_t) − (x_s − M_s))/T − ρ (each logit against its own row's
    maximum, as log_softmax does)."""
    gap = (top_t - top_s) / temperature
    far = gap.abs() > FAR_MAXIMA
    zero = torch.zeros_like(gap)
    shift_t, shift_s = torch.where(far, top_t, zero), torch.where(far, top_s, zero)
    return ((x_t - shift_t) - (x_s - shift_s)) / temperature - torch.where(far, rho, gap + rho)


def _kl_rows(x_s: torch.Tensor, x_t: torch.Tensor, temperature: float, skip: torch.Tensor | None = None):
    """Per row [B, 1]: (M_t, ℓ_t, KL(p_t ‖ p_s), ρ, M_s) for p = softmax(x / T) over the columns not in ``skip``,
    ρ = ℓ_t − ℓ_s after the Newton step (the large-|w| terms take p_s = p_t e^{−w₀}, consistent with w₀)."""
    top_s, ell_s, _ = _row_parts(x_s, temperature, skip)
    top_t, ell_t, log_p_t = _row_parts(x_t, temperature, skip)
    rho0 = ell_t - ell_s
    w0 = log_ratio(x_s, x_t, top_s, top_t, rho0, temperature)
    if skip is not None:
        w0 = w0.masked_fill(skip, 0.0)
    p_t = log_p_t.exp()
    terms = kl_term(p_t, (log_p_t - w0).exp(), w0)
    mass = p_t.sum(dim=1, keepdim=True)
    y = torch.log1p((terms - p_t * w0).sum(dim=1, keepdim=True) / mass)
    kl = (terms.sum(dim=1, keepdim=True) - mass * psi(-y)).clamp_min(0.0)
    return top_t, ell_t, kl, rho0 - y, top_s


def _log_probs(x_s: torch.Tensor, x_t: torch.Tensor, top_t: torch.Tensor, ell_t: torch.Tensor, rho: torch.Tensor,
               top_s: torch.Tensor, temperature: float, skip: torch.Tensor | None = None):
    """(log p_t, log p_s, w) of every column from a row's (M_t, ℓ_t, ρ, M_s); −inf, −inf, 0 at ``skip``."""
    log_p_t = (x_t - top_t) / temperature - ell_t
    log_p_s = (x_s - top_s) / temperature - (ell_t - rho)
    w = log_ratio(x_s, x_t, top_s, top_t, rho, temperature)
    if skip is not None:
        log_p_t, log_p_s = log_p_t.masked_fill(skip, float("-inf")), log_p_s.masked_fill(skip, float("-inf"))
        w = w.masked_fill(skip, 0.0)
    return log_p_t, log_p_s, w


def kd_forward_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float):
    """``fastkd::kd_loss``: (loss, stats [B, 5] = (M_t, ℓ_t, KL_b, ρ, M_s)) in the accumulation dtype."""
    top_t, ell_t, kl, rho, top_s = _kl_rows(upcast(logits_s), upcast(logits_t), temperature)
    loss = kl.sum() * (temperature**2 / logits_s.shape[0])
    return loss, torch.cat([top_t, ell_t, kl, rho, top_s], dim=1)


def kd_backward_reference(grad: torch.Tensor, logits_s: torch.Tensor, logits_t: torch.Tensor, stats: torch.Tensor,
                          temperature: float, teacher_grad: bool):
    """``fastkd::kd_loss_backward``: (d/d logits_s, d/d logits_t) times ``grad``; the second is
    empty ([0]) unless ``teacher_grad``."""
    top_t, ell_t, kl, rho, top_s = stats.split(1, dim=1)
    log_p_t, log_p_s, w = _log_probs(upcast(logits_s), upcast(logits_t), top_t, ell_t, rho, top_s, temperature)
    p_t = log_p_t.exp()
    scale = grad.to(stats.dtype) * (temperature / logits_s.shape[0])
    grad_s = (scale * prob_difference(p_t, log_p_s.exp(), w)).to(logits_s.dtype)
    if not teacher_grad:
        return grad_s, logits_t.new_empty(0)
    return grad_s, (scale * p_t * (w - kl)).to(logits_t.dtype)


def kd_with_grad_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float):
    """``fastkd::kd_loss_with_grad``: ``fastkd::kd_loss``'s (loss, stats) and the student's gradient for an
    upstream gradient of 1, d loss/d x_s = T/B·(p_s − p_t), in the logits' dtype. The CPU autograd of
    ``kd_loss`` runs it when only the student's gradient is wanted: a row's exponentials then serve the loss
    and the gradient, and backward only scales the gradient."""
    loss, stats = kd_forward_reference(logits_s, logits_t, temperature)
    one = torch.ones((), dtype=stats.dtype, device=stats.device)
    return loss, stats, kd_backward_reference(one, logits_s, logits_t, stats, temperature, False)[0]


def softplus_difference(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sp(a + d) − sp(a), sp(x) = log(1 + e^x), without cancellation: log1p(σ(a)·expm1(d)) for |d| < 1, else
    the parts max(x, 0) and log1p(e^{−|x|}) differenced apart (each exact or below log 2)."""
    near = d.abs() < 1.0
    d_near = d.clamp(-1.0, 1.0)
    small = torch.log1p(torch.sigmoid(a) * torch.expm1(d_near))
    far = (F.relu(a + d) - F.relu(a)) + (F.softplus(-(a + d).abs()) - F.softplus(-a.abs()))
    return torch.where(near, small, far)


def _binary(lam_t: torch.Tensor, gap: torch.Tensor):
    """Two-outcome distributions (target, rest) with log-odds λ_t and λ_s = λ_t − δ ([B, 1] each): (b_t, b_s,
    w = log b_t − log b_s), each [B, 2]; b = (σ(λ), σ(−λ)), log σ(λ) = −sp(−λ)."""
    lam_s = lam_t - gap
    b_t = torch.cat([torch.sigmoid(lam_t), torch.sigmoid(-lam_t)], dim=1)
    b_s = torch.cat([torch.sigmoid(lam_s), torch.sigmoid(-lam_s)], dim=1)
    w = torch.cat([softplus_difference(-lam_t, gap), softplus_difference(lam_t, -gap)], dim=1)
    return b_t, b_s, w


def _with_target(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor):
    """(x_s, x_t) in the accumulation dtype and the [B, C] mask of the target columns."""
    x_s, x_t = upcast(logits_s), upcast(logits_t)
    return x_s, x_t, torch.zeros_like(x_s, dtype=torch.bool).scatter(1, target.unsqueeze(1), True)


def _target_binaries(x_s: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor, top_t: torch.Tensor,
                     ell_t: torch.Tensor, rho: torch.Tensor, top_s: torch.Tensor, temperature: float):
    """(b_t, b_s, w) of TCKD's (target, rest) and of NCKD's (target − 1000, rest) from the target logits and
    the non-target (M_t, ℓ_t, ρ, M_s): λ_t = (x_t,g − M_t)/T − ℓ_t, δ = λ_t − λ_s = the target column's log_ratio."""
    xg_s, xg_t = x_s.gather(1, target.unsqueeze(1)), x_t.gather(1, target.unsqueeze(1))
    lam_t = (xg_t - top_t) / temperature - ell_t
    gap = log_ratio(xg_s, xg_t, top_s, top_t, rho, temperature)
    return _binary(lam_t, gap), _binary(lam_t - TARGET_SHIFT, gap)


def dkd_forward_reference(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float,
                          beta: float, temperature: float):
    """``fastkd::dkd_loss``: (loss, stats [B, 7] = (M_t, ℓ_t, TCKD_b, NCKD_b, ρ, M_s, K_b)) in the accumulation
    dtype (M, ℓ, ρ of the non-target classes)."""
    x_s, x_t, is_target = _with_target(logits_s, logits_t, target)
    top_t, ell_t, inner, rho, top_s = _kl_rows(x_s, x_t, temperature, skip=is_target)
    binary, masked = _target_binaries(x_s, x_t, target, top_t, ell_t, rho, top_s, temperature)
    tckd = kl_term(*binary).sum(dim=1, keepdim=True)
    nckd = masked[0][:, 1:] * inner + kl_term(*masked).sum(dim=1, keepdim=True)
    loss = (alpha * tckd + beta * nckd).sum() * (temperature**2 / logits_s.shape[0])
    return loss, torch.cat([top_t, ell_t, tckd, nckd, rho, top_s, inner], dim=1)


def dkd_backward_reference(grad: torch.Tensor, logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor,
                           stats: torch.Tensor, alpha: float, beta: float, temperature: float, teacher_grad: bool):
    """``fastkd::dkd_loss_backward``: (d/d logits_s, d/d logits_t) times ``grad`` (formulas above); the second
    is empty ([0]) unless ``teacher_grad``."""
    top_t, ell_t, _, _, rho, top_s, inner = stats.split(1, dim=1)
    x_s, x_t, is_target = _with_target(logits_s, logits_t, target)
    (b_t, b_s, w), (h_t, h_s, w_h) = _target_binaries(x_s, x_t, target, top_t, ell_t, rho, top_s, temperature)
    k = grad.to(stats.dtype) * (temperature / logits_s.shape[0])
    at_target = alpha * prob_difference(b_t[:, :1], b_s[:, :1], w[:, :1]) \
        + beta * prob_difference(h_t[:, :1], h_s[:, :1], w_h[:, :1])
    log_q_t, log_q_s, w_q = _log_probs(x_s, x_t, top_t, ell_t, rho, top_s, temperature, skip=is_target)
    q_t = log_q_t.exp()
    dq = prob_difference(q_t, log_q_s.exp(), w_q)
    r_t = h_t[:, 1:]
    grad_s = k * torch.where(is_target, at_target, beta * r_t * dq - (q_t + dq) * at_target)
    if not teacher_grad:
        return grad_s.to(logits_s.dtype), logits_t.new_empty(0)
    lam_grad = alpha * b_t[:, :1] * b_t[:, 1:] * (w[:, :1] - w[:, 1:]) \
        + beta * h_t[:, :1] * r_t * (w_h[:, :1] - w_h[:, 1:] - inner)
    grad_t = k * torch.where(is_target, lam_grad, q_t * (beta * r_t * (w_q - inner) - lam_grad))
    return grad_s.to(logits_s.dtype), grad_t.to(logits_t.dtype)


# ---------------------------------------------------------------- the ops

_KD_ARGS = "Tensor logits_s, Tensor logits_t, float temperature"
_DKD_ARGS = "Tensor logits_s, Tensor logits_t, Tensor target, float alpha, float beta, float temperature"


def _kd_fake(logits_s, logits_t, temperature):
    acc = accumulation_dtype(logits_s)
    return logits_s.new_empty((), dtype=acc), logits_s.new_empty((logits_s.shape[0], 5), dtype=acc)


def _kd_with_grad_fake(logits_s, logits_t, temperature):
    return _kd_fake(logits_s, logits_t, temperature) + (torch.empty_like(logits_s),)


def _dkd_fake(logits_s, logits_t, target, alpha, beta, temperature):
    acc = accumulation_dtype(logits_s)
    return logits_s.new_empty((), dtype=acc), logits_s.new_empty((logits_s.shape[0], 7), dtype=acc)


def _grads_fake(logits_s, logits_t, teacher_grad):
    return torch.empty_like(logits_s), torch.empty_like(logits_t) if teacher_grad else logits_t.new_empty(0)


def _kd_backward_fake(grad, logits_s, logits_t, stats, temperature, teacher_grad):
    return _grads_fake(logits_s, logits_t, teacher_grad)


def _dkd_backward_fake(grad, logits_s, logits_t, target, stats, alpha, beta, temperature, teacher_grad):
    return _grads_fake(logits_s, logits_t, teacher_grad)


def kd_autograd(kd_loss_backward: torch._ops.OpOverload) -> Autograd:
    """kd_loss's formula for a backend whose backward kernel is the op ``kd_loss_backward``: the logits and the
    per-row statistics are saved, and backward recomputes the softmaxes from them (no B×C tensor is kept),
    asking for the teacher's gradient only when the teacher logits need one."""

    def setup_context(ctx, inputs, output):
        logits_s, logits_t, ctx.temperature = inputs
        ctx.save_for_backward(logits_s, logits_t, output[1])

    def backward(ctx, grad_loss, grad_stats):
        logits_s, logits_t, stats = ctx.saved_tensors
        grad_s, grad_t = kd_loss_backward(grad_loss, logits_s, logits_t, stats, ctx.temperature,
                                          ctx.needs_input_grad[1])
        return grad_s, grad_t if ctx.needs_input_grad[1] else None, None

    return Autograd(setup_context, backward)


def dkd_autograd(dkd_loss_backward: torch._ops.OpOverload) -> Autograd:
    """dkd_loss's formula for a backend whose backward kernel is the op ``dkd_loss_backward`` (as kd_autograd)."""

    def setup_context(ctx, inputs, output):
        logits_s, logits_t, target, ctx.alpha, ctx.beta, ctx.temperature = inputs
        ctx.save_for_backward(logits_s, logits_t, target, output[1])

    def backward(ctx, grad_loss, grad_stats):
        logits_s, logits_t, target, stats = ctx.saved_tensors
        grad_s, grad_t = dkd_loss_backward(grad_loss, logits_s, logits_t, target, stats, ctx.alpha, ctx.beta,
                                           ctx.temperature, ctx.needs_input_grad[1])
        return (grad_s, grad_t if ctx.needs_input_grad[1] else None) + (None,) * 4

    return Autograd(setup_context, backward)


def _with_grad_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _with_grad_backward(ctx, grad_loss, grad_stats, grad_grad):
    """The student's gradient was taken in the forward pass: scale it by the upstream gradient."""
    (grad_s,) = ctx.saved_tensors
    return grad_s * grad_loss.to(grad_s.dtype), None, None


KD_LOSS_BACKWARD = define("kd_loss_backward(Tensor grad, Tensor logits_s, Tensor logits_t, Tensor stats, "
                          "float temperature, bool teacher_grad) -> (Tensor, Tensor)", kd_backward_reference,
                          _kd_backward_fake)
DKD_LOSS_BACKWARD = define("dkd_loss_backward(Tensor grad, Tensor logits_s, Tensor logits_t, Tensor target, "
                           "Tensor stats, float alpha, float beta, float temperature, bool teacher_grad) "
                           "-> (Tensor, Tensor)", dkd_backward_reference, _dkd_backward_fake)
KD_LOSS = define(f"kd_loss({_KD_ARGS}) -> (Tensor, Tensor)", kd_forward_reference, _kd_fake,
                 kd_autograd(KD_LOSS_BACKWARD))
DKD_LOSS = define(f"dkd_loss({_DKD_ARGS}) -> (Tensor, Tensor)", dkd_forward_reference, _dkd_fake,
                  dkd_autograd(DKD_LOSS_BACKWARD))
# serves the CPU autograd of kd_loss (csrc/cpu/logits_autograd.cpp) when only the student needs a gradient
KD_LOSS_WITH_GRAD = define(f"kd_loss_with_grad({_KD_ARGS}) -> (Tensor, Tensor, Tensor)", kd_with_grad_reference,
                           _kd_with_grad_fake, Autograd(_with_grad_setup_context, _with_grad_backward))


def kd(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KD loss on the chosen backend: the published computation for ``torch`` (its value to the last bit,
    its rounding at large T or a student close to its teacher included), else the fused op."""
    op = kernel_for("kd_loss", logits_s)
    if op is None:
        return kd_reference(logits_s, logits_t, temperature)
    return op(logits_s, logits_t, temperature)[0]


def dkd(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
        temperature: float) -> torch.Tensor:
    """The DKD loss on the chosen backend: the published computation for ``torch``, else the fused op."""
    op = kernel_for("dkd_loss", logits_s)
    if op is None:
        return dkd_reference(logits_s, logits_t, target, alpha, beta, temperature)
    return op(logits_s, logits_t, target, alpha, beta, temperature)[0]

"""Triton kernels of the logit losses: KD (Hinton, Vinyals & Dean 2015) and DKD (Zhao et al., CVPR 2022).

One program per row of the [B, C] logits; the row is read in chunks of BLOCK columns, so any class count
works (128k classes are 32 chunks of 4096). Loads are upcast to fp32; every exponential has the row's
largest logit M subtracted before the division by T. The formulas are those of fastkd/ops/logits.py (the
comment above its contract section): a row's KL(p_t ‖ p_s) is summed as Σ p_t ψ(w) with ψ(w) = e^{−w} − 1 + w
(its Taylor series for |w| < 1) and the log-ratios w formed from the logits' differences, then corrected by
one Newton step, so it stays accurate at large T and for a student close to its teacher.

* ``kd_forward_kernel``: pass 1, the maxima and Σ exp((x − M)/T) of both sides by the online rule (running max
  m and sum l, l ← l·exp((m − m')/T) + Σ exp((x − m')/T) per chunk); pass 2, the KL terms. Writes stats[b] =
  (M_t, ℓ_t, KL_b, ρ, M_s).
* ``kd_backward_kernel``: one pass, g·T/B·(p_s − p_t) and, with TEACHER, g·T/B·p_t (w − KL_b).
* ``dkd_forward_kernel``: the same two passes over the non-target classes, then the two-outcome divergences
  of the target from λ_t and δ. Writes stats[b] = (M_t, ℓ_t, TCKD_b, NCKD_b, ρ, M_s, K_b).
* ``dkd_backward_kernel``: one pass over the columns, the target column by its own formula.

The launchers are in fastkd/ops/logits_triton.py. The loss is T²/B Σ_b of the row terms, summed by the launcher.
"""
import triton
import triton.language as tl

_SHIFT = 1000.0       # mdistiller's −1000 on the target logit (NCKD)
_LOWEST = -3.0e38     # start of a running max: finite, so exp(m − m') never sees −inf − (−inf)
_FAR_MAXIMA = 8.0     # |M_t − M_s|/T above which log-ratios are taken against each row's own maximum


@triton.jit
def _psi_near_zero(w):
    """ψ(w) = e^{−w} − 1 + w for |w| ≤ 1: w² Σ_{n<10} (−w)^n / (n + 2)! by Horner's rule (fp32 rounding)."""
    u = -w
    total = 1.0 / 39916800.0
    total = total * u + 1.0 / 3628800.0
    total = total * u + 1.0 / 362880.0
    total = total * u + 1.0 / 40320.0
    total = total * u + 1.0 / 5040.0
    total = total * u + 1.0 / 720.0
    total = total * u + 1.0 / 120.0
    total = total * u + 1.0 / 24.0
    total = total * u + 1.0 / 6.0
    total = total * u + 0.5
    return w * w * total


@triton.jit
def _psi(w):
    """ψ(w) for any w."""
    near = tl.abs(w) < 1.0
    return tl.where(near, _psi_near_zero(tl.where(near, w, 0.0)), tl.exp(-tl.where(near, 0.0, w)) - 1.0 + w)


@triton.jit
def _kl_class(p_t, p_s, w):
    """(p_t ψ(w), p_s − p_t) of a KL's classes from p_t, p_s and w = log p_t − log p_s, the series for |w| < 1."""
    near = tl.abs(w) < 1.0
    w_near = tl.where(near, w, 0.0)
    series = _psi_near_zero(w_near)
    return tl.where(near, p_t * series, p_s - p_t + p_t * w), tl.where(near, p_t * (series - w_near), p_s - p_t)


@triton.jit
def _log1p(x):
    """log(1 + x) to fp32 rounding relative to the result (log(u)·x/(u − 1), u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _expm1(x):
    near = tl.abs(x) < 1.0
    return tl.where(near, _psi_near_zero(-tl.where(near, x, 0.0)) + x, tl.exp(tl.where(near, 0.0, x)) - 1.0)


@triton.jit
def _sigmoid(x):
    """σ(x) from e^{−|x|} ≤ 1 (no overflow for any x)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _ratio_frame(top_t, top_s, rho, inv_t):
    """(shift_t, shift_s, offset) with w = ((x_t − shift_t) − (x_s − shift_s))/T − offset: the logits' difference
    against Δ = (M_t − M_s)/T + ρ while the maxima are close, else each logit against its own maximum."""
    gap = (top_t - top_s) * inv_t
    far = tl.abs(gap) > _FAR_MAXIMA
    return tl.where(far, top_t, 0.0), tl.where(far, top_s, 0.0), tl.where(far, rho, gap + rho)


@triton.jit
def _load(row_ptr, cols, mask, other: tl.constexpr = 0.0):
    return tl.load(row_ptr + cols, mask=mask, other=other).to(tl.float32)


@triton.jit
def _online(m, total, x, inv_t):
    """One chunk of the online Σ exp((x − M)/T): (running max, running sum); masked x are −inf. While m is
    still the starting _LOWEST the sum is 0 (and (m − m')/T could overflow)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    total = total * tl.exp(tl.where(m == _LOWEST, 0.0, m - m_new) * inv_t)
    total = total + tl.sum(tl.exp((x - m_new) * inv_t), axis=0)
    return m_new, total


@triton.jit
def _kl_row(s_row, t_row, C, skip, inv_t, offs, BLOCK: tl.constexpr):
    """KL(p_t ‖ p_s) of a row over the columns < C other than ``skip`` (−1: none), p = softmax(x / T):
    (M_t, ℓ_t, KL, ρ, M_s, the log-ratio frame), the Newton step included."""
    m_s = tl.max(tl.full([BLOCK], _LOWEST, tl.float32), axis=0)
    m_t, l_s, l_t = m_s, m_s * 0.0, m_s * 0.0
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = (cols < C) & (cols != skip)
        m_s, l_s = _online(m_s, l_s, _load(s_row, cols, mask, float("-inf")), inv_t)
        m_t, l_t = _online(m_t, l_t, _load(t_row, cols, mask, float("-inf")), inv_t)
    rho0 = _log1p((l_t - l_s) / l_s)
    shift_t, shift_s, offset = _ratio_frame(m_t, m_s, rho0, inv_t)
    total = tl.zeros([BLOCK], tl.float32)
    change = tl.zeros([BLOCK], tl.float32)
    mass = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = (cols < C) & (cols != skip)
        x_s, x_t = _load(s_row, cols, mask), _load(t_row, cols, mask)
        p_t = tl.exp(tl.where(mask, (x_t - m_t) * inv_t, float("-inf"))) / l_t
        p_s = tl.exp(tl.where(mask, (x_s - m_s) * inv_t, float("-inf"))) / l_s
        term, diff = _kl_class(p_t, p_s, ((x_t - shift_t) - (x_s - shift_s)) * inv_t - offset)
        total += term
        change += diff
        mass += p_t
    p = tl.sum(mass, axis=0)
    y = _log1p(tl.sum(change, axis=0) / p)
    kl = tl.maximum(tl.sum(total, axis=0) - p * _psi(-y), 0.0)
    return m_t, tl.log(l_t), kl, rho0 - y, m_s


@triton.jit
def kd_forward_kernel(s_ptr, t_ptr, stats_ptr, C, stride_s, stride_t, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    top_t, ell_t, kl, rho, top_s = _kl_row(s_row, t_row, C, -1, inv_t, tl.arange(0, BLOCK), BLOCK)
    out = stats_ptr + row * 5
    tl.store(out, top_t)
    tl.store(out + 1, ell_t)
    tl.store(out + 2, kl)
    tl.store(out + 3, rho)
    tl.store(out + 4, top_s)


@triton.jit
def _backward_columns(s_row, t_row, cols, mask, top_t, ell_t, rho, top_s, inv_t):
    """(p_t, w, p_s − p_t) of a chunk from the row's (M_t, ℓ_t, ρ, M_s); 0, finite, 0 at masked columns."""
    x_s, x_t = _load(s_row, cols, mask), _load(t_row, cols, mask)
    shift_t, shift_s, offset = _ratio_frame(top_t, top_s, rho, inv_t)
    w = ((x_t - shift_t) - (x_s - shift_s)) * inv_t - offset
    p_t = tl.exp(tl.where(mask, (x_t - top_t) * inv_t - ell_t, float("-inf")))
    _, diff = _kl_class(p_t, tl.exp(tl.where(mask, (x_s - top_s) * inv_t - (ell_t - rho), float("-inf"))), w)
    return p_t, w, diff


@triton.jit
def kd_backward_kernel(grad_ptr, s_ptr, t_ptr, stats_ptr, gs_ptr, gt_ptr, C, stride_s, stride_t, inv_t, scale,
                       TEACHER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    k = tl.load(grad_ptr).to(tl.float32) * scale
    st = stats_ptr + row * 5
    top_t, ell_t, kl, rho, top_s = tl.load(st), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3), tl.load(st + 4)
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        p_t, w, diff = _backward_columns(s_row, t_row, cols, mask, top_t, ell_t, rho, top_s, inv_t)
        tl.store(gs_ptr + row * C + cols, (k * diff).to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER:
            tl.store(gt_ptr + row * C + cols, (k * p_t * (w - kl)).to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softplus_difference(a, d):
    """sp(a + d) − sp(a) without cancellation: log1p(σ(a)·expm1(d)) for |d| < 1, else the parts max(x, 0) and
    log1p(e^{−|x|}) differenced apart."""
    near = tl.abs(d) < 1.0
    small = _log1p(_sigmoid(a) * _expm1(tl.where(near, d, 0.0)))
    far = (tl.maximum(a + d, 0.0) - tl.maximum(a, 0.0)) + (_log1p(tl.exp(-tl.abs(a + d))) - _log1p(tl.exp(-tl.abs(a))))
    return tl.where(near, small, far)


@triton.jit
def _binary(lam_t, gap):
    """Two-outcome distributions (target, rest), log-odds λ_t and λ_t − δ: (KL(b_t ‖ b_s), b_t,gt, b_t,o,
    b_s,gt − b_t,gt, w_gt, w_o)."""
    lam_s = lam_t - gap
    bt_gt, bt_o = _sigmoid(lam_t), _sigmoid(-lam_t)
    w_gt, w_o = _softplus_difference(-lam_t, gap), _softplus_difference(lam_t, -gap)
    term_gt, diff_gt = _kl_class(bt_gt, _sigmoid(lam_s), w_gt)
    term_o, _ = _kl_class(bt_o, _sigmoid(-lam_s), w_o)
    return term_gt + term_o, bt_gt, bt_o, diff_gt, w_gt, w_o


@triton.jit
def _target(s_row, t_row, g, C, top_t, ell_t, rho, top_s, inv_t):
    """λ_t and δ of a row's target column (an out-of-range target, unchecked on the device, reads nothing)."""
    valid = (g >= 0) & (g < C)
    xg_s = tl.load(s_row + g, mask=valid, other=0.0).to(tl.float32)
    xg_t = tl.load(t_row + g, mask=valid, other=0.0).to(tl.float32)
    shift_t, shift_s, offset = _ratio_frame(top_t, top_s, rho, inv_t)
    return (xg_t - top_t) * inv_t - ell_t, ((xg_t - shift_t) - (xg_s - shift_s)) * inv_t - offset


@triton.jit
def dkd_forward_kernel(s_ptr, t_ptr, y_ptr, stats_ptr, C, stride_s, stride_t, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    g = tl.load(y_ptr + row)
    top_t, ell_t, inner, rho, top_s = _kl_row(s_row, t_row, C, g, inv_t, tl.arange(0, BLOCK), BLOCK)
    lam_t, gap = _target(s_row, t_row, g, C, top_t, ell_t, rho, top_s, inv_t)
    tckd, _, _, _, _, _ = _binary(lam_t, gap)
    kl_hat, _, r_t, _, _, _ = _binary(lam_t - _SHIFT, gap)
    out = stats_ptr + row * 7
    tl.store(out, top_t)
    tl.store(out + 1, ell_t)
    tl.store(out + 2, tckd)
    tl.store(out + 3, r_t * inner + kl_hat)
    tl.store(out + 4, rho)
    tl.store(out + 5, top_s)
    tl.store(out + 6, inner)


@triton.jit
def dkd_backward_kernel(grad_ptr, s_ptr, t_ptr, y_ptr, stats_ptr, gs_ptr, gt_ptr, C, stride_s, stride_t, inv_t, scale,
                        alpha, beta, TEACHER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    k = tl.load(grad_ptr).to(tl.float32) * scale
    g = tl.load(y_ptr + row)
    st = stats_ptr + row * 7
    top_t, ell_t, rho, top_s, inner = tl.load(st), tl.load(st + 1), tl.load(st + 4), tl.load(st + 5), tl.load(st + 6)
    lam_t, gap = _target(s_row, t_row, g, C, top_t, ell_t, rho, top_s, inv_t)
    _, bt_gt, bt_o, diff_gt, w_gt, w_o = _binary(lam_t, gap)
    _, g_t, r_t, diff_hat, w_hat_gt, w_hat_o = _binary(lam_t - _SHIFT, gap)
    # ∂/∂x_s,g = k·A and ∂/∂x_t,g = k·G; the other classes: k·(β r_t (q_s − q_t) − q_s A), k·q_t (β r_t (w − K) − G)
    at_target = alpha * diff_gt + beta * diff_hat
    lam_grad = alpha * bt_gt * bt_o * (w_gt - w_o) + beta * g_t * r_t * (w_hat_gt - w_hat_o - inner)
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        is_target = cols == g
        q_t, w, dq = _backward_columns(s_row, t_row, cols, mask & (cols != g), top_t, ell_t, rho, top_s, inv_t)
        grad_s = tl.where(is_target, at_target, beta * r_t * dq - (q_t + dq) * at_target)
        tl.store(gs_ptr + row * C + cols, (k * grad_s).to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER:
            grad_t = tl.where(is_target, lam_grad, q_t * (beta * r_t * (w - inner) - lam_grad))
            tl.store(gt_ptr + row * C + cols, (k * grad_t).to(gt_ptr.dtype.element_ty), mask=mask)

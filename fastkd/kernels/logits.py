"""Triton kernels of the logit losses: KD (Hinton, Vinyals & Dean 2015) and DKD (Zhao et al., CVPR 2022).

One program per row of the [B, C] logits; the row is read in chunks of BLOCK columns, so any class count
works (128k classes are 32 chunks of 4096). With z = x / T in fp32 (every load is upcast first):

* ``kd_forward_kernel``: pass 1, the two log-sum-exps by the online rule (running max m and sum l,
  l ← l·exp(m − m') + Σ exp(z − m') per chunk); pass 2, KL_b = Σ_c p_t (log p_t − log p_s).
  Writes stats[b] = (lse_s, lse_t, KL_b).
* ``kd_backward_kernel``: one pass, g·T/B·(p_s − p_t) and, with TEACHER, g·T/B·p_t (log p_t − log p_s − KL_b).
* ``dkd_forward_kernel``: pass 1, O = lse over the non-target classes of each side; pass 2,
  Σ_{c≠g} q_t (log q_t − log q_s); the per-row TCKD / NCKD terms from these and z_g.
  Writes stats[b] = (O_s, O_t, TCKD_b, NCKD_b).
* ``dkd_backward_kernel``: one pass over the columns, the target column by its own formula.

The formulas are those of fastkd/ops/logits.py (module docstring); the launchers are in
fastkd/ops/logits_triton.py. The loss is T²/B Σ_b of the row terms, summed by the launcher.
"""
import triton
import triton.language as tl

_SHIFT = 1000.0       # mdistiller's −1000 on the target logit (NCKD)
_LOWEST = -3.0e38     # start of a running max: finite, so exp(m − m') never sees −inf − (−inf)


@triton.jit
def _online_lse(m, total, z):
    """One chunk of the online log-sum-exp: (running max, running Σ exp(z − max)); masked z are −inf."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
    return m_new, total


@triton.jit
def _load_scaled(row_ptr, cols, mask, inv_t, other: tl.constexpr = 0.0):
    """z = x / T of one chunk in fp32; masked columns read ``other`` (−inf for a log-sum-exp, else 0)."""
    return tl.load(row_ptr + cols, mask=mask, other=other).to(tl.float32) * inv_t


@triton.jit
def _log_add_exp(a, b):
    top = tl.maximum(a, b)
    return top + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _lse_pair(s_row, t_row, C, skip, inv_t, offs, BLOCK: tl.constexpr):
    """log Σ exp(z/T) of the student and teacher rows over columns < C other than ``skip`` (−1: none),
    one online pass over BLOCK-wide chunks."""
    m_s = tl.max(tl.full([BLOCK], _LOWEST, tl.float32), axis=0)
    m_t, l_s, l_t = m_s, m_s * 0.0, m_s * 0.0
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = (cols < C) & (cols != skip)
        m_s, l_s = _online_lse(m_s, l_s, _load_scaled(s_row, cols, mask, inv_t, float("-inf")))
        m_t, l_t = _online_lse(m_t, l_t, _load_scaled(t_row, cols, mask, inv_t, float("-inf")))
    return m_s + tl.log(l_s), m_t + tl.log(l_t)


@triton.jit
def kd_forward_kernel(s_ptr, t_ptr, stats_ptr, C, stride_s, stride_t, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK)
    lse_s, lse_t = _lse_pair(s_row, t_row, C, -1, inv_t, offs, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        log_ps = _load_scaled(s_row, cols, mask, inv_t) - lse_s
        log_pt = _load_scaled(t_row, cols, mask, inv_t) - lse_t
        acc += tl.where(mask, tl.exp(log_pt) * (log_pt - log_ps), 0.0)
    out = stats_ptr + row * 3
    tl.store(out, lse_s)
    tl.store(out + 1, lse_t)
    tl.store(out + 2, tl.sum(acc, axis=0))


@triton.jit
def kd_backward_kernel(grad_ptr, s_ptr, t_ptr, stats_ptr, gs_ptr, gt_ptr, C, stride_s, stride_t, inv_t, scale,
                       TEACHER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    k = tl.load(grad_ptr).to(tl.float32) * scale
    lse_s = tl.load(stats_ptr + row * 3)
    lse_t = tl.load(stats_ptr + row * 3 + 1)
    kl = tl.load(stats_ptr + row * 3 + 2)
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        log_ps = _load_scaled(s_row, cols, mask, inv_t) - lse_s
        log_pt = _load_scaled(t_row, cols, mask, inv_t) - lse_t
        p_t = tl.exp(log_pt)
        tl.store(gs_ptr + row * C + cols, (k * (tl.exp(log_ps) - p_t)).to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER:
            grad_t = k * p_t * (log_pt - log_ps - kl)
            tl.store(gt_ptr + row * C + cols, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dkd_row(z_g, other):
    """(log b_gt, log b_o, log r, log ĝ) of a row from z_g and O = lse of its non-target classes."""
    lse_all = _log_add_exp(other, z_g)
    lse_masked = _log_add_exp(other, z_g - _SHIFT)
    return z_g - lse_all, other - lse_all, other - lse_masked, z_g - _SHIFT - lse_masked


@triton.jit
def dkd_forward_kernel(s_ptr, t_ptr, y_ptr, stats_ptr, C, stride_s, stride_t, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    g = tl.load(y_ptr + row)
    valid = (g >= 0) & (g < C)  # an out-of-range target (unchecked on the device) reads nothing outside the row
    zg_s = tl.load(s_row + g, mask=valid, other=0.0).to(tl.float32) * inv_t
    zg_t = tl.load(t_row + g, mask=valid, other=0.0).to(tl.float32) * inv_t
    offs = tl.arange(0, BLOCK)
    other_s, other_t = _lse_pair(s_row, t_row, C, g, inv_t, offs, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = (cols < C) & (cols != g)
        log_qs = _load_scaled(s_row, cols, mask, inv_t) - other_s
        log_qt = _load_scaled(t_row, cols, mask, inv_t) - other_t
        acc += tl.where(mask, tl.exp(log_qt) * (log_qt - log_qs), 0.0)
    inner = tl.sum(acc, axis=0)
    lb_gt_s, lb_o_s, log_r_s, log_g_s = _dkd_row(zg_s, other_s)
    lb_gt_t, lb_o_t, log_r_t, log_g_t = _dkd_row(zg_t, other_t)
    tckd = tl.exp(lb_gt_t) * (lb_gt_t - lb_gt_s) + tl.exp(lb_o_t) * (lb_o_t - lb_o_s)
    nckd = tl.exp(log_r_t) * (inner + log_r_t - log_r_s) + tl.exp(log_g_t) * (log_g_t - log_g_s)
    out = stats_ptr + row * 4
    tl.store(out, other_s)
    tl.store(out + 1, other_t)
    tl.store(out + 2, tckd)
    tl.store(out + 3, nckd)


@triton.jit
def dkd_backward_kernel(grad_ptr, s_ptr, t_ptr, y_ptr, stats_ptr, gs_ptr, gt_ptr, C, stride_s, stride_t, inv_t, scale,
                        alpha, beta, TEACHER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    k = tl.load(grad_ptr).to(tl.float32) * scale
    g = tl.load(y_ptr + row)
    other_s = tl.load(stats_ptr + row * 4)
    other_t = tl.load(stats_ptr + row * 4 + 1)
    tckd = tl.load(stats_ptr + row * 4 + 2)
    nckd = tl.load(stats_ptr + row * 4 + 3)
    valid = (g >= 0) & (g < C)
    lb_gt_s, lb_o_s, log_r_s, log_g_s = _dkd_row(tl.load(s_row + g, mask=valid, other=0.0).to(tl.float32) * inv_t,
                                                 other_s)
    lb_gt_t, lb_o_t, log_r_t, log_g_t = _dkd_row(tl.load(t_row + g, mask=valid, other=0.0).to(tl.float32) * inv_t,
                                                 other_t)
    b_o_t, b_gt_t, r_t = tl.exp(lb_o_t), tl.exp(lb_gt_t), tl.exp(log_r_t)
    coef_s = alpha * (tl.exp(lb_o_s) - b_o_t) + beta * tl.exp(log_r_s)
    coef_t = beta * r_t
    g_t = tl.exp(log_g_t)
    target_s = k * (alpha * (tl.exp(lb_gt_s) - b_gt_t) + beta * (tl.exp(log_g_s) - g_t))
    tc_t = alpha * b_o_t * ((lb_o_t - lb_o_s) - tckd)
    shift_t = log_r_t - log_r_s - nckd
    target_t = k * (alpha * b_gt_t * ((lb_gt_t - lb_gt_s) - tckd) + beta * g_t * (log_g_t - log_g_s - nckd))
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        is_target = cols == g
        other = mask & (cols != g)
        log_qs = _load_scaled(s_row, cols, other, inv_t) - other_s
        log_qt = _load_scaled(t_row, cols, other, inv_t) - other_t
        q_t = tl.exp(log_qt)
        grad_s = tl.where(is_target, target_s, k * (tl.exp(log_qs) * coef_s - coef_t * q_t))
        tl.store(gs_ptr + row * C + cols, grad_s.to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER:
            grad_t = k * q_t * (tc_t + coef_t * (log_qt - log_qs + shift_t))
            grad_t = tl.where(is_target, target_t, grad_t)
            tl.store(gt_ptr + row * C + cols, grad_t.to(gt_ptr.dtype.element_ty), mask=mask)

"""Triton kernels of the batch-relation ops (fastkd/ops/similarity.py): SP, CCKD, PKT, RKD distance and angle;
and IUSP, SP inside each sequence (fastkd/ops/iusp.py).

Each loss is a function of the Gram matrices G = XXᵀ ([B, B], B ≤ 256) of the student and teacher
batches X ([B, D]); the op returns the loss and M = ∂L/∂G + (∂L/∂G)ᵀ, and backward is ∂L/∂X = M·X.

* ``matmul_kernel``: C = scale·A·B with fp32 accumulation, A and B given by strides (so Xᵀ is X
  with its strides swapped): the Grams, and backward's M·X (``scale`` read from a pointer, the
  upstream gradient, so nothing syncs). Half-precision tiles are multiplied as they are (their
  products are exact in fp32); fp32 tiles in IEEE fp32 (no TF32).
* ``sp_rows_kernel``, ``cckd_rows_kernel``, ``pkt_rows_kernel``: one program per row i of the two
  Grams; the whole elementwise chain of the loss and its derivative along that row, writing the
  loss partial and row i of ∂L/∂G (the direct part, for CCKD / PKT without the path through the
  norms) for both sides, and for CCKD / PKT the per-row factor dν_i/dG_ii / ν_i.
* ``iusp_rows_kernel``: IUSP (fastkd/ops/iusp.py), SP's row chain (``sp_row``, shared with ``sp_rows_kernel``)
  on row i of sequence b's T × T Grams, one program per (row, sequence), over the sequence's own length.
* ``symmetrize_kernel``: M = D + Dᵀ row by row, plus (``NORM_PATH``) the path through the norms
  ν_i(G_ii): M_ii += −2·(Σ_j M_ij G_ij)·dν_i/ν_i.
* ``rkd_sums_kernel``, ``rkd_rows_kernel``, ``rkd_grad_kernel``, ``rkd_finish_kernel``: RKD's
  distances need their mean μ over the batch first, so four row passes: sums of d (→ μ), the loss
  and u = ∂L/∂(d_s/μ_s), v = ∂L/∂d²_s, and M from v.
* ``rkd_angle_pairs_kernel``, ``rkd_angle_rows_kernel``: RKD's angles a_ijk = (q_ij + q_ik − q_jk)/2 · r_ij r_ik
  from the squared distances q (B × B) and r = 1/max(√q, eps) of each side; one program per row p computes
  anchor p's B² angles and the B² angles of the triangles whose far side has corner p, tile by tile of
  BLOCK_J rows, giving the loss and row p of ∂L/∂q (two parts, summed before ``rkd_finish_kernel`` makes M).

Every load is upcast to fp32 before arithmetic; the row kernels hold one row (BLOCK_B ≥ B) in
registers.
"""
import triton
import triton.language as tl


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, row_ptr, col_ptr, M, N, K, stride_ab, stride_am, stride_ak,
                  stride_bb, stride_bk, stride_bn, stride_cb, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_ROW_COL: tl.constexpr):
    """C[z] = scale·A[z]·B[z] for batch z = program_id(2); grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), batches).

    ``HAS_ROW_COL``: the epilogue also multiplies C[i, j] by row[i]·col[j] (fp32 vectors of M and N,
    shared by the batches): the cosine matrix's inverse norms, applied without normalised copies.
    """
    pid_m, pid_n, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + z * stride_ab
    b_base = b_ptr + z * stride_bb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_base + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_base + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if HALF:
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr).to(tl.float32)
    if HAS_ROW_COL:
        row = tl.load(row_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)
        col = tl.load(col_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc = acc * row[:, None] * col[None, :]
    c = c_ptr + z * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _row(g_ptr, i, B, BLOCK_B: tl.constexpr):
    """(row i of G, its column offsets, the mask, the diagonal of G) in fp32."""
    cols = tl.arange(0, BLOCK_B)
    mask = cols < B
    row = tl.load(g_ptr + i * B + cols, mask=mask, other=0.0).to(tl.float32)
    diag = tl.load(g_ptr + cols * (B + 1), mask=mask, other=1.0).to(tl.float32)
    return row, cols, mask, diag


@triton.jit
def sp_row(rs, rt, scale, eps):
    """SP on one row of each Gram (fp32, zero past the row's end): y = g / max(‖g_i‖, eps); returns
    (Σ_j (y_s − y_t)², and the rownorm backward of ±scale·(y_s − y_t): the row of D for each side)."""
    ns = tl.sqrt(tl.sum(rs * rs, axis=0))
    nt = tl.sqrt(tl.sum(rt * rt, axis=0))
    ys = rs / tl.maximum(ns, eps)
    yt = rt / tl.maximum(nt, eps)
    diff = ys - yt
    inner_s = tl.where(ns >= eps, tl.sum(ys * diff, axis=0), 0.0)
    inner_t = tl.where(nt >= eps, tl.sum(yt * diff, axis=0), 0.0)
    return (tl.sum(diff * diff, axis=0), scale * (diff - ys * inner_s) / tl.maximum(ns, eps),
            -scale * (diff - yt * inner_t) / tl.maximum(nt, eps))


@triton.jit
def sp_rows_kernel(gs_ptr, gt_ptr, ds_ptr, dt_ptr, loss_ptr, B, scale, eps, BLOCK_B: tl.constexpr):
    """SP: y = g / max(‖g_i‖, eps) per row; loss_i = Σ_j (y_s − y_t)²; D = rownorm backward of ±scale·(y_s − y_t)."""
    i = tl.program_id(0)
    rs, cols, mask, _ = _row(gs_ptr, i, B, BLOCK_B)
    rt, _, _, _ = _row(gt_ptr, i, B, BLOCK_B)
    loss, ds, dt = sp_row(rs, rt, scale, eps)
    tl.store(loss_ptr + i, loss)
    tl.store(ds_ptr + i * B + cols, ds, mask=mask)
    tl.store(dt_ptr + i * B + cols, dt, mask=mask)


@triton.jit
def iusp_rows_kernel(gs_ptr, gt_ptr, ds_ptr, dt_ptr, len_ptr, loss_ptr, B, T, eps, BLOCK_T: tl.constexpr):
    """IUSP, SP inside each sequence: grid (T, B), program (i, b) takes row i of sequence b's Grams ([B, T, T]
    contiguous) over its first L_b = len[b] columns; loss[b, i] = Σ_j (y_s − y_t)² / (B·L_b²) and row i of D
    (scale 2/(B·L_b²)); a padded row (i ≥ L_b) and the padded columns get 0."""
    i = tl.program_id(0)
    b = tl.program_id(1)
    n = tl.load(len_ptr + b)
    base = b.to(tl.int64) * T * T + i * T
    cols = tl.arange(0, BLOCK_T)
    valid = cols < tl.where(i < n, n, 0)  # (a padded row reads nothing)
    rs = tl.load(gs_ptr + base + cols, mask=valid, other=0.0).to(tl.float32)
    rt = tl.load(gt_ptr + base + cols, mask=valid, other=0.0).to(tl.float32)
    nf = n.to(tl.float32)
    weight = 1.0 / (B * nf * nf)
    loss, ds, dt = sp_row(rs, rt, 2.0 * weight, eps)
    tl.store(loss_ptr + b * T + i, loss * weight)
    tl.store(ds_ptr + base + cols, ds, mask=cols < T)
    tl.store(dt_ptr + base + cols, dt, mask=cols < T)


@triton.jit
def _nu(n, eps, ADDITIVE: tl.constexpr):
    """(ν, dν/dG_ii) from n = √G_ii: PKT ν = n + eps, CCKD ν = max(n, eps)."""
    if ADDITIVE:
        nu = n + eps
        dnu = tl.where(n > 0, 0.5 / tl.where(n > 0, n, 1.0), 0.0)
    else:
        nu = tl.maximum(n, eps)
        dnu = tl.where(n >= eps, 0.5 / tl.maximum(n, eps), 0.0)
    return nu, dnu


@triton.jit
def _cosine_row(g_ptr, i, B, eps, ADDITIVE: tl.constexpr, BLOCK_B: tl.constexpr):
    """Row i of G with what c_ij = G_ij / (ν_i ν_j) needs: (row, cols, mask, 1/(ν_i ν_j), ν_i, dν_i/dG_ii)."""
    row, cols, mask, diag = _row(g_ptr, i, B, BLOCK_B)
    nu, _ = _nu(tl.sqrt(tl.maximum(diag, 0.0)), eps, ADDITIVE)
    nu_i, dnu_i = _nu(tl.sqrt(tl.maximum(tl.load(g_ptr + i * (B + 1)).to(tl.float32), 0.0)), eps, ADDITIVE)
    return row, cols, mask, 1.0 / (nu_i * nu), nu_i, dnu_i


@triton.jit
def cckd_rows_kernel(gs_ptr, gt_ptr, ds_ptr, dt_ptr, fs_ptr, ft_ptr, loss_ptr, coef_ptr, B, scale, eps,
                     ORDER: tl.constexpr, BLOCK_B: tl.constexpr):
    """CCKD: c = G/(ν_i ν_j), k = Σ_p coef_p c^p; loss_i = Σ_j (k_s − k_t)²; D = ±scale·(k_s − k_t)·k'(c)/(ν_i ν_j)."""
    i = tl.program_id(0)
    rs, cols, mask, inv_s, nui_s, dnui_s = _cosine_row(gs_ptr, i, B, eps, False, BLOCK_B)
    rt, _, _, inv_t, nui_t, dnui_t = _cosine_row(gt_ptr, i, B, eps, False, BLOCK_B)
    cs = rs * inv_s
    ct = rt * inv_t
    top = tl.load(coef_ptr + ORDER)
    ks = tl.zeros_like(cs) + top
    kt = tl.zeros_like(ct) + top
    dks = tl.zeros_like(cs)
    dkt = tl.zeros_like(ct)
    for q in tl.static_range(ORDER):
        c = tl.load(coef_ptr + ORDER - 1 - q)
        dks = dks * cs + ks
        dkt = dkt * ct + kt
        ks = ks * cs + c
        kt = kt * ct + c
    diff = tl.where(mask, ks - kt, 0.0)
    tl.store(loss_ptr + i, tl.sum(diff * diff, axis=0))
    tl.store(ds_ptr + i * B + cols, scale * diff * dks * inv_s, mask=mask)
    tl.store(dt_ptr + i * B + cols, -scale * diff * dkt * inv_t, mask=mask)
    tl.store(fs_ptr + i, dnui_s / nui_s)
    tl.store(ft_ptr + i, dnui_t / nui_t)


@triton.jit
def pkt_rows_kernel(gs_ptr, gt_ptr, ds_ptr, dt_ptr, fs_ptr, ft_ptr, loss_ptr, B, inv_bb, eps, BLOCK_B: tl.constexpr):
    """PKT: P = rows of (c + 1)/2 normalised to sum 1; loss_i = Σ_j P_t log((P_t + ε)/(P_s + ε)); D through
    the row sums, (c + 1)/2 and c = G/(ν_i ν_j)."""
    i = tl.program_id(0)
    rs, cols, mask, inv_s, nui_s, dnui_s = _cosine_row(gs_ptr, i, B, eps, True, BLOCK_B)
    rt, _, _, inv_t, nui_t, dnui_t = _cosine_row(gt_ptr, i, B, eps, True, BLOCK_B)
    ss = tl.where(mask, (rs * inv_s + 1.0) * 0.5, 0.0)
    st = tl.where(mask, (rt * inv_t + 1.0) * 0.5, 0.0)
    tot_s = tl.sum(ss, axis=0)
    tot_t = tl.sum(st, axis=0)
    ps = ss / tot_s
    pt = st / tot_t
    log_ratio = tl.log((pt + eps) / (ps + eps))
    tl.store(loss_ptr + i, tl.sum(tl.where(mask, pt * log_ratio, 0.0), axis=0))
    dps = tl.where(mask, -pt / (ps + eps) * inv_bb, 0.0)
    dpt = tl.where(mask, (log_ratio + pt / (pt + eps)) * inv_bb, 0.0)
    inner_s = tl.sum(dps * ps, axis=0)
    inner_t = tl.sum(dpt * pt, axis=0)
    tl.store(ds_ptr + i * B + cols, (dps - inner_s) / tot_s * 0.5 * inv_s, mask=mask)
    tl.store(dt_ptr + i * B + cols, (dpt - inner_t) / tot_t * 0.5 * inv_t, mask=mask)
    tl.store(fs_ptr + i, dnui_s / nui_s)
    tl.store(ft_ptr + i, dnui_t / nui_t)


@triton.jit
def symmetrize_kernel(d_ptr, g_ptr, f_ptr, m_ptr, B, NORM_PATH: tl.constexpr, BLOCK_B: tl.constexpr):
    """Row i of M = D + Dᵀ; with NORM_PATH, M_ii += −2·(Σ_j M_ij G_ij)·f_i (f_i = dν_i/dG_ii / ν_i). A grid
    (B, N) runs it on N contiguous [B, B] matrices (matrix z = program_id(1); IUSP's, without NORM_PATH)."""
    i = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64) * B * B
    d_ptr = d_ptr + z
    m_ptr = m_ptr + z
    cols = tl.arange(0, BLOCK_B)
    mask = cols < B
    m = tl.load(d_ptr + i * B + cols, mask=mask, other=0.0) + tl.load(d_ptr + cols * B + i, mask=mask, other=0.0)
    if NORM_PATH:
        g = tl.load(g_ptr + i * B + cols, mask=mask, other=0.0).to(tl.float32)
        corr = -2.0 * tl.sum(m * g, axis=0) * tl.load(f_ptr + i)
        m = m + tl.where(cols == i, corr, 0.0)
    tl.store(m_ptr + i * B + cols, m, mask=mask)


@triton.jit
def _distances(g_ptr, i, B, dist_eps, BLOCK_B: tl.constexpr):
    """(row i of d = √max(G_ii + G_jj − 2G_ij, eps) with d_ii = 0, d² before the clamp, columns, mask)."""
    row, cols, mask, diag = _row(g_ptr, i, B, BLOCK_B)
    gii = tl.load(g_ptr + i * (B + 1)).to(tl.float32)
    d2 = gii + diag - 2.0 * row
    off = mask & (cols != i)
    d = tl.where(off, tl.sqrt(tl.maximum(d2, dist_eps)), 0.0)
    return d, d2, cols, mask, off


@triton.jit
def rkd_sums_kernel(gs_ptr, gt_ptr, sums_ptr, B, dist_eps, BLOCK_B: tl.constexpr):
    """Row sums of d_s, d_t and the count of d_s > 0: sums[0, i], sums[1, i], sums[2, i]."""
    i = tl.program_id(0)
    ds, _, _, _, _ = _distances(gs_ptr, i, B, dist_eps, BLOCK_B)
    dt, _, _, _, _ = _distances(gt_ptr, i, B, dist_eps, BLOCK_B)
    tl.store(sums_ptr + i, tl.sum(ds, axis=0))
    tl.store(sums_ptr + B + i, tl.sum(dt, axis=0))
    tl.store(sums_ptr + 2 * B + i, tl.sum(tl.where(ds > 0, 1.0, 0.0), axis=0))


@triton.jit
def _rkd_means(sums_ptr, B, BLOCK_B: tl.constexpr):
    """(μ_s, μ_t, count) from rkd_sums_kernel's partials (μ_t over the teacher's own count of d_t > 0 = the student's
    off-diagonal count: every off-diagonal distance is at least √eps > 0)."""
    cols = tl.arange(0, BLOCK_B)
    mask = cols < B
    count = tl.sum(tl.load(sums_ptr + 2 * B + cols, mask=mask, other=0.0), axis=0)
    mu_s = tl.sum(tl.load(sums_ptr + cols, mask=mask, other=0.0), axis=0) / count
    mu_t = tl.sum(tl.load(sums_ptr + B + cols, mask=mask, other=0.0), axis=0) / count
    return mu_s, mu_t, count


@triton.jit
def rkd_rows_kernel(gs_ptr, gt_ptr, sums_ptr, u_ptr, loss_ptr, weighted_ptr, B, inv_bb, dist_eps,
                    BLOCK_B: tl.constexpr):
    """Row i: loss_i = Σ_j smooth-L1(d_s/μ_s − d_t/μ_t); u = clamp(x, ±1)/B²; Σ_j u·d_s."""
    i = tl.program_id(0)
    mu_s, mu_t, _ = _rkd_means(sums_ptr, B, BLOCK_B)
    ds, _, cols, mask, _ = _distances(gs_ptr, i, B, dist_eps, BLOCK_B)
    dt, _, _, _, _ = _distances(gt_ptr, i, B, dist_eps, BLOCK_B)
    x = tl.where(mask, ds / mu_s - dt / mu_t, 0.0)
    ax = tl.abs(x)
    tl.store(loss_ptr + i, tl.sum(tl.where(ax < 1.0, 0.5 * x * x, ax - 0.5), axis=0))
    u = tl.minimum(tl.maximum(x, -1.0), 1.0) * inv_bb
    tl.store(u_ptr + i * B + cols, u, mask=mask)
    tl.store(weighted_ptr + i, tl.sum(u * ds, axis=0))


@triton.jit
def rkd_grad_kernel(gs_ptr, sums_ptr, u_ptr, weighted_ptr, v_ptr, B, dist_eps, BLOCK_B: tl.constexpr):
    """Row i of v = ∂L/∂d²_s = (u/μ_s − Σ(u·d_s)/(μ_s²·count)) / (2 d_s) where the clamp passes, off the diagonal."""
    i = tl.program_id(0)
    mu_s, _, count = _rkd_means(sums_ptr, B, BLOCK_B)
    cols = tl.arange(0, BLOCK_B)
    mask = cols < B
    through_mu = tl.sum(tl.load(weighted_ptr + cols, mask=mask, other=0.0), axis=0) / (mu_s * mu_s * count)
    ds, d2, _, _, off = _distances(gs_ptr, i, B, dist_eps, BLOCK_B)
    u = tl.load(u_ptr + i * B + cols, mask=mask, other=0.0)
    passes = off & (d2 >= dist_eps)
    v = tl.where(passes, (u / mu_s - through_mu) / (2.0 * tl.where(passes, ds, 1.0)), 0.0)
    tl.store(v_ptr + i * B + cols, v, mask=mask)


@triton.jit
def rkd_finish_kernel(v_ptr, m_ptr, B, BLOCK_B: tl.constexpr):
    """Row i of M from V = v + vᵀ (d²_ij = G_ii + G_jj − 2G_ij): M_ij = −2V_ij off the diagonal, M_ii = 2Σ_j V_ij."""
    i = tl.program_id(0)
    cols = tl.arange(0, BLOCK_B)
    mask = cols < B
    v = tl.load(v_ptr + i * B + cols, mask=mask, other=0.0) + tl.load(v_ptr + cols * B + i, mask=mask, other=0.0)
    m = tl.where(cols == i, 2.0 * tl.sum(v, axis=0), -2.0 * v)
    tl.store(m_ptr + i * B + cols, m, mask=mask)


# --- RKD angle term (fastkd/ops/similarity.py, rkd_angle_with_grad_reference) -----------------

@triton.jit
def rkd_angle_pairs_kernel(g_ptr, q_ptr, r_ptr, rho_ptr, B, zero_tol, norm_eps, HAS_RHO: tl.constexpr,
                           BLOCK_B: tl.constexpr):
    """Row i of q = G_ii + G_jj − 2G_ij, r = 1/max(√q, eps) and (HAS_RHO) ρ = r² where √q ≥ eps; a zero difference
    (j = i, or q ≤ zero_tol·(G_ii + G_jj)) gets q = r = ρ = 0."""
    i = tl.program_id(0)
    row, cols, mask, diag = _row(g_ptr, i, B, BLOCK_B)
    both = tl.load(g_ptr + i * (B + 1)).to(tl.float32) + diag
    q = both - 2.0 * row
    zero = (cols == i) | (q <= zero_tol * both)
    n = tl.sqrt(tl.maximum(q, 0.0))
    r = tl.where(zero, 0.0, 1.0 / tl.maximum(n, norm_eps))
    tl.store(q_ptr + i * B + cols, tl.where(zero, 0.0, q), mask=mask)
    tl.store(r_ptr + i * B + cols, r, mask=mask)
    if HAS_RHO:
        tl.store(rho_ptr + i * B + cols, tl.where(n >= norm_eps, r * r, 0.0), mask=mask)


@triton.jit
def _angles(q_pair, half_r_pair, q_row, q_tile, r_scale, FAR: tl.constexpr):
    """[BLOCK_J, BLOCK_B] angles with pair quantities along axis 0 and row p's along axis 1: anchor p's a_pjk =
    (q_pj + q_pk − q_jk)·(r_pj/2)·r_pk (r_scale = r_pk, a row), or (FAR) anchor i's a_ipk = (q_ip + q_ik − q_pk)·
    (r_ip/2)·r_ik (r_scale = r_ik, the tile)."""
    if FAR:
        return (q_pair[:, None] + q_tile - q_row[None, :]) * half_r_pair[:, None] * r_scale
    return (q_pair[:, None] + q_row[None, :] - q_tile) * half_r_pair[:, None] * r_scale[None, :]


@triton.jit
def rkd_angle_rows_kernel(qs_ptr, rs_ptr, rhos_ptr, qt_ptr, rt_ptr, u1_ptr, u2_ptr, loss_ptr, B, inv_b3,
                          BLOCK_J: tl.constexpr, BLOCK_B: tl.constexpr):
    """Row p: loss_p = Σ_jk smooth-L1(a^s_pjk − a^t_pjk); with g = clamp(a^s − a^t, ±1)/B³, the anchor part of
    ∂L/∂q, u1_pj = r_pj Σ_k g_pjk r_pk − ρ_pj Σ_k g_pjk a^s_pjk, and the far-side part u2_pk = −½ Σ_i g_ipk r_ip r_ik
    (0 where r_pk = 0), over tiles of BLOCK_J rows j (or i) of the B × B matrices."""
    p = tl.program_id(0)
    cols = tl.arange(0, BLOCK_B)
    cmask = cols < B
    qs_p = tl.load(qs_ptr + p * B + cols, mask=cmask, other=0.0)
    rs_p = tl.load(rs_ptr + p * B + cols, mask=cmask, other=0.0)
    qt_p = tl.load(qt_ptr + p * B + cols, mask=cmask, other=0.0)
    rt_p = tl.load(rt_ptr + p * B + cols, mask=cmask, other=0.0)
    far = tl.zeros((BLOCK_B,), dtype=tl.float32)
    loss = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for j0 in range(0, B, BLOCK_J):
        rows = j0 + tl.arange(0, BLOCK_J)
        rmask = rows < B
        mask = rmask[:, None] & cmask[None, :]
        tile = rows[:, None] * B + cols[None, :]
        qs = tl.load(qs_ptr + tile, mask=mask, other=0.0)
        rs = tl.load(rs_ptr + tile, mask=mask, other=0.0)
        qt = tl.load(qt_ptr + tile, mask=mask, other=0.0)
        rt = tl.load(rt_ptr + tile, mask=mask, other=0.0)
        # anchor p, pairs (p, j): row p at the tile's rows
        rs_pj = tl.load(rs_ptr + p * B + rows, mask=rmask, other=0.0)
        a_s = _angles(tl.load(qs_ptr + p * B + rows, mask=rmask, other=0.0), 0.5 * rs_pj, qs_p, qs, rs_p, False)
        a_t = _angles(tl.load(qt_ptr + p * B + rows, mask=rmask, other=0.0),
                      0.5 * tl.load(rt_ptr + p * B + rows, mask=rmask, other=0.0), qt_p, qt, rt_p, False)
        x = tl.where(mask, a_s - a_t, 0.0)
        ax = tl.abs(x)
        loss += tl.sum(tl.where(ax < 1.0, 0.5 * x * x, ax - 0.5), axis=0)
        g = tl.minimum(tl.maximum(x, -1.0), 1.0) * inv_b3
        rho_pj = tl.load(rhos_ptr + p * B + rows, mask=rmask, other=0.0)
        u1 = rs_pj * tl.sum(g * rs_p[None, :], axis=1) - rho_pj * tl.sum(g * a_s, axis=1)
        tl.store(u1_ptr + p * B + rows, u1, mask=rmask)
        # anchors i = the tile's rows, p a corner of their far sides: column p at the tile's rows
        rs_ip = tl.load(rs_ptr + rows * B + p, mask=rmask, other=0.0)
        b_s = _angles(tl.load(qs_ptr + rows * B + p, mask=rmask, other=0.0), 0.5 * rs_ip, qs_p, qs, rs, True)
        b_t = _angles(tl.load(qt_ptr + rows * B + p, mask=rmask, other=0.0),
                      0.5 * tl.load(rt_ptr + rows * B + p, mask=rmask, other=0.0), qt_p, qt, rt, True)
        y = tl.where(mask, b_s - b_t, 0.0)
        far += tl.sum(tl.minimum(tl.maximum(y, -1.0), 1.0) * rs * rs_ip[:, None], axis=0)
    tl.store(loss_ptr + p, tl.sum(loss, axis=0))
    tl.store(u2_ptr + p * B + cols, tl.where(rs_p != 0.0, -0.5 * inv_b3 * far, 0.0), mask=cmask)


# --- NST (fastkd/ops/nst.py): channel normalisation and the Gram epilogues --------------------

@triton.jit
def rownorm_kernel(x_ptr, unit_ptr, norm_ptr, HW, eps, BLOCK: tl.constexpr):
    """Row r of [R, HW]: unit = x / max(‖x‖, eps) in fp32, and the norm."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < HW
    x = tl.load(x_ptr + r * HW + cols, mask=mask, other=0.0).to(tl.float32)
    n = tl.sqrt(tl.sum(x * x, axis=0))
    tl.store(unit_ptr + r * HW + cols, x / tl.maximum(n, eps), mask=mask)
    tl.store(norm_ptr + r, n)


@triton.jit
def rownorm_backward_kernel(unit_ptr, norm_ptr, grad_unit_ptr, grad_ptr, HW, eps, BLOCK: tl.constexpr):
    """Row r: ∂L/∂x = (g − y·(y·g)) / ‖x‖ (g / eps where ‖x‖ < eps), in the input's dtype."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < HW
    y = tl.load(unit_ptr + r * HW + cols, mask=mask, other=0.0)
    g = tl.load(grad_unit_ptr + r * HW + cols, mask=mask, other=0.0)
    n = tl.load(norm_ptr + r)
    inner = tl.where(n >= eps, tl.sum(y * g, axis=0), 0.0)
    grad = (g - y * inner) / tl.maximum(n, eps)
    tl.store(grad_ptr + r * HW + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def nst_spatial_kernel(a_ptr, c_ptr, loss_ptr, N, inv_cs, inv_ct, scale_s, scale_t, BLOCK: tl.constexpr):
    """Row r of the spatial Grams a = SᵀS, c = TᵀT ([B·HW, HW]): loss_r = Σ (a/C_s − c/C_t)²; in place
    a ← scale_s·(a/C_s − c/C_t), c ← scale_t·a, so that ∂L/∂S = S·a and ∂L/∂T = T·c."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    a = tl.load(a_ptr + r * N + cols, mask=mask, other=0.0)
    c = tl.load(c_ptr + r * N + cols, mask=mask, other=0.0)
    diff = a * inv_cs - c * inv_ct
    tl.store(loss_ptr + r, tl.sum(diff * diff, axis=0))
    tl.store(c_ptr + r * N + cols, scale_t * a, mask=mask)
    tl.store(a_ptr + r * N + cols, scale_s * diff, mask=mask)


@triton.jit
def sumsq_scale_kernel(x_ptr, partial_ptr, numel, scale, BLOCK: tl.constexpr):
    """Block p of a flat fp32 tensor: partial_p = Σ x², then x ← scale·x in place."""
    p = tl.program_id(0)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(partial_ptr + p, tl.sum(x * x, axis=0))
    tl.store(x_ptr + offs, x * scale, mask=mask)

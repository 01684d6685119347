"""Triton kernels of CRD's fused ops (Tian, Krishnan & Isola, ICLR 2020): memory-bank NCE and bank update.

One NCE side scores anchors v[b] ([B, D]) against K+1 rows j[b, k] of a bank ([N, D]):
s[b, k] = <bank[j[b, k]], v[b]>, log P = s/T − log Z, column 0 the positive, noise probability K/N. Its loss
is −(1/B)·Σ_b [log(P_b0 / (P_b0 + c)) + Σ_{k≥1} log((K/N) / (P_bk + c))], c = K/N + ε, each term computed from
log P (no P is formed: Z spans e^(±1/T)). Z comes and goes as log Z, −∞ while not estimated. Z is fixed within
the step, so every term depends on one score only and d loss/d v[b] = Σ_k (d loss/d s[b, k])·bank[j[b, k]] is
accumulated while the row is in registers: each pass reads each sampled row once, and nothing of size
B×(K+1) is stored (the indices are regenerated, not kept).

Kernels (pure functions of pointers, strides and constexprs; the launchers are in fastkd/ops/crd_triton.py):

* ``crd_lse_kernel`` / ``crd_shared_lse_kernel``: the log-sum-exp partials of s/T (for Z's estimate); only
  where the side's Z is still unknown (< 0, read on the device), otherwise the programs write neutral
  partials and read no row.
* ``crd_nce_kernel`` / ``crd_shared_nce_kernel``: NCE terms, anchor-gradient partials and, for the Z moving
  average, the log-sum-exp partials of this batch. The shared-negatives variants score a block of anchors
  against a block of rows drawn once for the whole batch as a matrix product (``tl.dot``).
* ``crd_log_z_kernel``, ``crd_grad_reduce_kernel``, ``crd_finish_kernel``: the small reductions between and
  after them (log Z, the anchor gradients, the loss and the new Z).
* ``crd_bank_update_kernel``: momentum update + L2 renormalisation of the batch rows, a repeated index
  taking the row of its last occurrence.

Negatives come from :func:`philox_word0`, the contract of fastkd/ops/philox.py bit for bit.
Every load is upcast to fp32 before arithmetic.
"""
import triton
import triton.language as tl


@triton.jit
def philox_word0(seed, offset, counter):
    """First output word (uint32) of Philox4x32-10 for int64 ``counter``; ``seed``, ``offset`` int64 scalars.

    key = (seed lo, seed hi), counter words = (counter lo, counter hi, offset lo, offset hi); ten rounds of
    (c0, c1, c2, c3) ← (hi(B·c2) ⊕ c1 ⊕ k0, lo(B·c2), hi(A·c0) ⊕ c3 ⊕ k1, lo(A·c0)), round r keyed with
    key + r·(0x9E3779B9, 0xBB67AE85) mod 2³².
    The 32×32 → 64-bit products are exact uint64 multiplies (one wide multiply on the GPU, and no wrapping
    arithmetic for Triton's overflow sanitiser to flag).
    """
    k0 = seed & 0xFFFFFFFF
    k1 = (seed >> 32) & 0xFFFFFFFF
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c2 = zero + offset.to(tl.uint32)
    c3 = zero + (offset >> 32).to(tl.uint32)
    for r in tl.static_range(10):
        prod_b = c2.to(tl.uint64) * 0xCD9E8D57
        prod_a = c0.to(tl.uint64) * 0xD2511F53
        key0 = (k0 + r * 0x9E3779B9).to(tl.uint32)
        key1 = (k1 + r * 0xBB67AE85).to(tl.uint32)
        c0 = (prod_b >> 32).to(tl.uint32) ^ c1 ^ key0
        c2 = (prod_a >> 32).to(tl.uint32) ^ c3 ^ key1
        c1 = prod_b.to(tl.uint32)
        c3 = prod_a.to(tl.uint32)
    return c0


@triton.jit
def uniform_index(word, num_data):
    """(word · N) >> 32 as int64: a row index uniform over [0, N) (N < 2³¹)."""
    return tl.umulhi(word, tl.zeros_like(word) + num_data).to(tl.int64)


@triton.jit
def _log1p(u):
    """log(1 + u) for u ≥ 0, to fp32 relative precision for small u too (series below 1/16)."""
    v = tl.minimum(u, 0.0625)  # the series is only used below 1/16; keep the other lanes finite
    series = 0.16666666666666666 - v * 0.14285714285714285  # v − v²/2 + v³/3 − … + v⁷/7, by Horner
    series = 0.2 - v * series
    series = 0.25 - v * series
    series = 0.3333333333333333 - v * series
    series = 0.5 - v * series
    series = v * (1.0 - v * series)
    return tl.where(u < 0.0625, series, tl.log(1.0 + u))


@triton.jit
def _softplus_sigmoid(x):
    """(log(1 + eˣ), 1 / (1 + e⁻ˣ)) from one exponential, finite and accurate for every x."""
    e = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + _log1p(e), tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _z_unknown(log_z_ptr):
    """Whether the stored log Z is not estimated yet (−∞, or NaN)."""
    return ~(tl.load(log_z_ptr).to(tl.float32) > float("-inf"))


@triton.jit
def _nce_terms(logits, is_positive, valid, log_z, log_c, kappa):
    """Per-score NCE term and its derivative by the logit s/T (0 where not ``valid``), from log P = s/T − log Z.

    Positive: log(P / (P + c)) = −softplus(log c − log P), slope c / (P + c) = σ(log c − log P); negative:
    log(noise / (P + c)) = −κ − softplus(log P − log c) with κ = log1p(ε / noise), slope −σ(log P − log c).
    """
    log_p = logits - log_z
    x = tl.where(is_positive, log_c - log_p, log_p - log_c)
    softplus, sigmoid = _softplus_sigmoid(x)
    term = tl.where(valid, tl.where(is_positive, -softplus, -kappa - softplus), 0.0)
    slope = tl.where(valid, tl.where(is_positive, sigmoid, -sigmoid), 0.0)
    return term, slope


@triton.jit
def _lse_merge(m_run, s_run, m, s, AXIS: tl.constexpr):
    """Fold partials (m, s) — Σ s·exp(m) — into the running (m_run, s_run) along AXIS; −inf-safe."""
    m_new = tl.maximum(m_run, tl.max(m, axis=AXIS))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    if AXIS == 0:
        shift_b = shift
    else:
        shift_b = shift[:, None]
    s_new = s_run * tl.exp(m_run - shift) + tl.sum(s * tl.exp(m - shift_b), axis=AXIS)
    return m_new, s_new


@triton.jit
def _lse_fold(m_run, s_run, x, col_mask):
    """Fold one block of scores x (its columns outside ``col_mask`` ignored) into a running log-sum-exp."""
    return _lse_merge(m_run, s_run, tl.where(col_mask, x, float("-inf")), tl.where(col_mask, 1.0, 0.0), 0)


@triton.jit
def _column_rows(b, cols, col_mask, idx_ptr, cidx_ptr, stride_cb, stride_ck, seed, offset, K, N,
                 HAS_CIDX: tl.constexpr):
    """Bank rows of anchor b's columns ``cols``: explicit, or idx[b] then Philox draws n = b·K + k − 1."""
    if HAS_CIDX:
        rows = tl.load(cidx_ptr + b * stride_cb + cols * stride_ck, mask=col_mask, other=0).to(tl.int64)
    else:
        positive = tl.load(idx_ptr + b).to(tl.int64)
        drawn = uniform_index(philox_word0(seed, offset, b.to(tl.int64) * K + (cols - 1)), N)
        rows = tl.where(cols == 0, positive, drawn)
    return rows


@triton.jit
def _gather(bank_ptr, rows, row_mask, stride_bn, stride_bd, offs_d, d_mask):
    """[len(rows), BLOCK_D] fp32 tile of bank rows (zeros where masked or out of [0, N))."""
    mask = row_mask[:, None] & d_mask[None, :]
    ptrs = bank_ptr + rows[:, None] * stride_bn + offs_d[None, :] * stride_bd
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rng(rng_ptr, HAS_CIDX: tl.constexpr):
    if HAS_CIDX:
        seed = 0
        offset = 0
    else:
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)
    return seed, offset


@triton.jit
def _anchor(anchor_ptr, b, stride_ab, stride_ad, offs_d, D):
    return tl.load(anchor_ptr + b * stride_ab + offs_d * stride_ad, mask=offs_d < D, other=0.0).to(tl.float32)


@triton.jit
def _scores(bank_ptr, rows, row_mask, stride_bn, stride_bd, offs_d, D, anchor, inv_t):
    """(row tile [BLOCK_K, BLOCK_D] fp32, s/T [BLOCK_K]) of one side for one block of columns."""
    tile = _gather(bank_ptr, rows, row_mask, stride_bn, stride_bd, offs_d, offs_d < D)
    return tile, tl.sum(tile * anchor[None, :], axis=1) * inv_t


@triton.jit
def crd_lse_kernel(v_s_ptr, v_t_ptr, mem_s_ptr, mem_t_ptr, idx_ptr, cidx_ptr, rng_ptr, z_s_ptr, z_t_ptr, lse_ptr,
                   stride_sb, stride_sd, stride_tb, stride_td, stride_msn, stride_msd, stride_mtn, stride_mtd,
                   stride_cb, stride_ck, COLS, K, N, D_S, D_T, inv_t, blocks_per_split,
                   HAS_CIDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, split), both sides: (max, Σ exp(s/T − max)) over its columns → lse[side, b, split, 0:2].

    Only for a side whose Z is still unknown (log Z = −∞); the other side's partials are (0, 0) and, when
    both Z are known, the program reads no row at all. Each drawn index serves the two banks.
    """
    b = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    out_s = lse_ptr + (b * n_split + split) * 2
    out_t = out_s + tl.num_programs(0) * n_split * 2
    need_s = _z_unknown(z_s_ptr)
    need_t = _z_unknown(z_t_ptr)
    if need_s | need_t:
        seed, offset = _rng(rng_ptr, HAS_CIDX)
        offs_d = tl.arange(0, BLOCK_D)
        a_s = _anchor(v_s_ptr, b, stride_sb, stride_sd, offs_d, D_S)
        a_t = _anchor(v_t_ptr, b, stride_tb, stride_td, offs_d, D_T)
        start = split * blocks_per_split
        end = tl.minimum(start + blocks_per_split, tl.cdiv(COLS, BLOCK_K))
        m_s = float("-inf")
        e_s = 0.0
        m_t = float("-inf")
        e_t = 0.0
        for blk in range(start, end):
            cols = blk * BLOCK_K + tl.arange(0, BLOCK_K)
            col_mask = cols < COLS
            rows = _column_rows(b, cols, col_mask, idx_ptr, cidx_ptr, stride_cb, stride_ck, seed, offset, K, N,
                                HAS_CIDX)
            valid = col_mask & (rows >= 0) & (rows < N)
            _, x_s = _scores(mem_t_ptr, rows, tl.where(need_s, valid, False), stride_mtn, stride_mtd, offs_d, D_S,
                             a_s, inv_t)
            m_s, e_s = _lse_fold(m_s, e_s, x_s, col_mask)
            _, x_t = _scores(mem_s_ptr, rows, tl.where(need_t, valid, False), stride_msn, stride_msd, offs_d, D_T,
                             a_t, inv_t)
            m_t, e_t = _lse_fold(m_t, e_t, x_t, col_mask)
        tl.store(out_s, tl.where(need_s, m_s, 0.0))
        tl.store(out_s + 1, tl.where(need_s, e_s, 0.0))
        tl.store(out_t, tl.where(need_t, m_t, 0.0))
        tl.store(out_t + 1, tl.where(need_t, e_t, 0.0))
    else:
        tl.store(out_s, 0.0)
        tl.store(out_s + 1, 0.0)
        tl.store(out_t, 0.0)
        tl.store(out_t + 1, 0.0)


@triton.jit
def crd_nce_kernel(v_s_ptr, v_t_ptr, mem_s_ptr, mem_t_ptr, idx_ptr, cidx_ptr, rng_ptr, z_s_ptr, z_t_ptr, log_z_ptr,
                   loss_ptr, grad_s_ptr, grad_t_ptr, lse_ptr,
                   stride_sb, stride_sd, stride_tb, stride_td, stride_msn, stride_msd, stride_mtn, stride_mtd,
                   stride_cb, stride_ck, COLS, K, N, D_S, D_T, inv_t, log_c, kappa, grad_scale,
                   blocks_per_split,
                   HAS_CIDX: tl.constexpr, ESTIMATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, split), both sides: Σ NCE terms → loss[b, split]; Σ_k (d loss/d s)·row → grad_*[b, split].

    ``log_z_ptr`` holds log Z of both sides. With ESTIMATE (Z moving average) a side whose Z is known also
    gets this batch's log-sum-exp partials in lse (where Z is unknown, crd_lse_kernel wrote them).
    """
    b = tl.program_id(0)
    split = tl.program_id(1)
    slot = b * tl.num_programs(1) + split
    count = tl.num_programs(0) * tl.num_programs(1)
    seed, offset = _rng(rng_ptr, HAS_CIDX)
    log_z_s = tl.load(log_z_ptr)
    log_z_t = tl.load(log_z_ptr + 1)
    offs_d = tl.arange(0, BLOCK_D)
    a_s = _anchor(v_s_ptr, b, stride_sb, stride_sd, offs_d, D_S)
    a_t = _anchor(v_t_ptr, b, stride_tb, stride_td, offs_d, D_T)
    start = split * blocks_per_split
    end = tl.minimum(start + blocks_per_split, tl.cdiv(COLS, BLOCK_K))
    loss_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    grad_s = tl.zeros([BLOCK_D], dtype=tl.float32)
    grad_t = tl.zeros([BLOCK_D], dtype=tl.float32)
    m_s = float("-inf")
    e_s = 0.0
    m_t = float("-inf")
    e_t = 0.0
    for blk in range(start, end):
        cols = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        col_mask = cols < COLS
        rows = _column_rows(b, cols, col_mask, idx_ptr, cidx_ptr, stride_cb, stride_ck, seed, offset, K, N,
                            HAS_CIDX)
        valid = col_mask & (rows >= 0) & (rows < N)
        tile_s, x_s = _scores(mem_t_ptr, rows, valid, stride_mtn, stride_mtd, offs_d, D_S, a_s, inv_t)
        term_s, slope_s = _nce_terms(x_s, cols == 0, col_mask, log_z_s, log_c, kappa)
        grad_s += tl.sum((slope_s * grad_scale)[:, None] * tile_s, axis=0)
        tile_t, x_t = _scores(mem_s_ptr, rows, valid, stride_msn, stride_msd, offs_d, D_T, a_t, inv_t)
        term_t, slope_t = _nce_terms(x_t, cols == 0, col_mask, log_z_t, log_c, kappa)
        grad_t += tl.sum((slope_t * grad_scale)[:, None] * tile_t, axis=0)
        loss_acc += term_s + term_t
        if ESTIMATE:
            m_s, e_s = _lse_fold(m_s, e_s, x_s, col_mask)
            m_t, e_t = _lse_fold(m_t, e_t, x_t, col_mask)
    tl.store(loss_ptr + slot, tl.sum(loss_acc, axis=0))
    tl.store(grad_s_ptr + slot * D_S + offs_d, grad_s, mask=offs_d < D_S)
    tl.store(grad_t_ptr + slot * D_T + offs_d, grad_t, mask=offs_d < D_T)
    if ESTIMATE:
        known_s = ~_z_unknown(z_s_ptr)
        known_t = ~_z_unknown(z_t_ptr)
        tl.store(lse_ptr + slot * 2, m_s, mask=known_s)
        tl.store(lse_ptr + slot * 2 + 1, e_s, mask=known_s)
        tl.store(lse_ptr + (count + slot) * 2, m_t, mask=known_t)
        tl.store(lse_ptr + (count + slot) * 2 + 1, e_t, mask=known_t)


@triton.jit
def _anchor_block(anchor_ptr, offs_b, b_mask, stride_ab, stride_ad, offs_d, d_mask):
    ptrs = anchor_ptr + offs_b[:, None] * stride_ab + offs_d[None, :] * stride_ad
    return tl.load(ptrs, mask=b_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _shared_rows(q, q_mask, seed, offset, N):
    """Rows of negatives q ∈ [0, K), the same for every anchor: Philox counter n = q."""
    return tl.where(q_mask, uniform_index(philox_word0(seed, offset, q.to(tl.int64)), N), 0)


@triton.jit
def crd_shared_lse_kernel(anchor_ptr, bank_ptr, idx_ptr, rng_ptr, z_ptr, lse_ptr,
                          stride_ab, stride_ad, stride_bn, stride_bd,
                          B, K, N, D, inv_t, blocks_per_split,
                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Shared negatives, program (anchor block, split): lse partials per anchor, as crd_lse_kernel.

    Negative block scores are tl.dot(anchors, rowsᵀ); split 0 also scores each anchor's positive.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    out = lse_ptr + (offs_b * n_split + split) * 2
    if _z_unknown(z_ptr):
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        anchors = _anchor_block(anchor_ptr, offs_b, b_mask, stride_ab, stride_ad, offs_d, d_mask)
        pos_mask = tl.where(split == 0, b_mask, False)  # (vector & scalar trips the interpreter)
        pos_rows = tl.load(idx_ptr + offs_b, mask=pos_mask, other=0).to(tl.int64)
        pos_tile = _gather(bank_ptr, pos_rows, pos_mask & (pos_rows >= 0) & (pos_rows < N), stride_bn, stride_bd,
                           offs_d, d_mask)
        m_run = tl.where(pos_mask, tl.sum(pos_tile * anchors, axis=1) * inv_t, float("-inf"))
        s_run = tl.where(pos_mask, 1.0, 0.0)
        start = split * blocks_per_split
        end = tl.minimum(start + blocks_per_split, tl.cdiv(K, BLOCK_K))
        for blk in range(start, end):
            q = blk * BLOCK_K + tl.arange(0, BLOCK_K)
            q_mask = q < K
            tile = _gather(bank_ptr, _shared_rows(q, q_mask, seed, offset, N), q_mask, stride_bn, stride_bd,
                           offs_d, d_mask)
            logits = tl.dot(anchors, tl.trans(tile), input_precision="ieee") * inv_t
            m_run, s_run = _lse_merge(m_run, s_run, tl.where(q_mask[None, :], logits, float("-inf")),
                                      tl.where(q_mask[None, :], 1.0, 0.0), 1)
        tl.store(out, m_run, mask=b_mask)
        tl.store(out + 1, s_run, mask=b_mask)
    else:
        tl.store(out, tl.zeros([BLOCK_B], dtype=tl.float32), mask=b_mask)
        tl.store(out + 1, tl.zeros([BLOCK_B], dtype=tl.float32), mask=b_mask)


@triton.jit
def crd_shared_nce_kernel(anchor_ptr, bank_ptr, idx_ptr, rng_ptr, z_ptr, log_z_ptr,
                          loss_ptr, grad_ptr, lse_ptr,
                          stride_ab, stride_ad, stride_bn, stride_bd,
                          B, K, N, D, inv_t, log_c, kappa, grad_scale, blocks_per_split,
                          ESTIMATE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Shared negatives, program (anchor block, split): as crd_nce_kernel, scores and gradients as products.

    S = anchors·rowsᵀ ([BLOCK_B, BLOCK_K]) and grad += (d loss/d S)·rows ([BLOCK_B, BLOCK_D]), fp32 (ieee).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    slot = offs_b * n_split + split
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1)
    log_z = tl.load(log_z_ptr)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    anchors = _anchor_block(anchor_ptr, offs_b, b_mask, stride_ab, stride_ad, offs_d, d_mask)
    # the positive column, in split 0 only
    pos_mask = tl.where(split == 0, b_mask, False)  # (vector & scalar trips the interpreter)
    pos_rows = tl.load(idx_ptr + offs_b, mask=pos_mask, other=0).to(tl.int64)
    pos_tile = _gather(bank_ptr, pos_rows, pos_mask & (pos_rows >= 0) & (pos_rows < N), stride_bn, stride_bd,
                       offs_d, d_mask)
    pos_logits = tl.sum(pos_tile * anchors, axis=1) * inv_t
    loss_acc, pos_slope = _nce_terms(pos_logits, True, pos_mask, log_z, log_c, kappa)
    grad_acc = (pos_slope * grad_scale)[:, None] * pos_tile
    m_run = tl.where(pos_mask, pos_logits, float("-inf"))
    s_run = tl.where(pos_mask, 1.0, 0.0)
    start = split * blocks_per_split
    end = tl.minimum(start + blocks_per_split, tl.cdiv(K, BLOCK_K))
    for blk in range(start, end):
        q = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        q_mask = q < K
        tile = _gather(bank_ptr, _shared_rows(q, q_mask, seed, offset, N), q_mask, stride_bn, stride_bd,
                       offs_d, d_mask)
        logits = tl.dot(anchors, tl.trans(tile), input_precision="ieee") * inv_t
        valid = b_mask[:, None] & q_mask[None, :]
        term, slope = _nce_terms(logits, False, valid, log_z, log_c, kappa)
        loss_acc += tl.sum(term, axis=1)
        grad_acc += tl.dot(slope * grad_scale, tile, input_precision="ieee")
        if ESTIMATE:
            m_run, s_run = _lse_merge(m_run, s_run, tl.where(q_mask[None, :], logits, float("-inf")),
                                      tl.where(q_mask[None, :], 1.0, 0.0), 1)
    tl.store(loss_ptr + slot, loss_acc, mask=b_mask)
    tl.store(grad_ptr + slot[:, None] * D + offs_d[None, :], grad_acc, mask=b_mask[:, None] & d_mask[None, :])
    if ESTIMATE:
        known = ~_z_unknown(z_ptr)
        tl.store(lse_ptr + slot * 2, m_run, mask=tl.where(known, b_mask, False))
        tl.store(lse_ptr + slot * 2 + 1, s_run, mask=tl.where(known, b_mask, False))


@triton.jit
def _lse_total(lse_ptr, count, BLOCK: tl.constexpr):
    """log Σ_i s_i·exp(m_i) over ``count`` (m, s) pairs at lse_ptr (−inf when all s are 0)."""
    m_run = float("-inf")
    s_run = 0.0
    for begin in range(0, count, BLOCK):
        offs = begin + tl.arange(0, BLOCK)
        mask = offs < count
        m = tl.load(lse_ptr + offs * 2, mask=mask, other=float("-inf"))
        s = tl.load(lse_ptr + offs * 2 + 1, mask=mask, other=0.0)
        m_run, s_run = _lse_merge(m_run, s_run, m, s, 0)
    return m_run + tl.log(tl.maximum(s_run, 1e-30))  # s_run is 0 (nothing written) or ≥ 1


@triton.jit
def _log_z_side(z_ptr, lse_ptr, out_ptr, count, log_scale, BLOCK: tl.constexpr):
    log_estimate = _lse_total(lse_ptr, count, BLOCK) + log_scale
    tl.store(out_ptr, tl.where(_z_unknown(z_ptr), log_estimate, tl.load(z_ptr).to(tl.float32)))


@triton.jit
def crd_log_z_kernel(z_s_ptr, z_t_ptr, lse_ptr, log_z_ptr, count, log_scale, BLOCK: tl.constexpr):
    """One program: log Z of both sides → log_z[0:2]; the batch estimate log(mean(exp(s/T))·N) where unknown.

    ``lse_ptr`` is [2, count, 2]; ``log_scale`` = log N − log(B·(K+1)).
    """
    _log_z_side(z_s_ptr, lse_ptr, log_z_ptr, count, log_scale, BLOCK)
    _log_z_side(z_t_ptr, lse_ptr + count * 2, log_z_ptr + 1, count, log_scale, BLOCK)


@triton.jit
def _sum(ptr, count, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for begin in range(0, count, BLOCK):
        offs = begin + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _z_new_side(z_ptr, lse_ptr, out_ptr, count, log_scale, log_m, log_1m, BLOCK: tl.constexpr,
                MOVING: tl.constexpr):
    log_z = tl.load(z_ptr).to(tl.float32)
    estimate = _lse_total(lse_ptr, count, BLOCK) + log_scale
    if MOVING:  # log(m·Z + (1 − m)·estimate), a log-add-exp
        a = log_m + log_z
        b = log_1m + estimate
        known = tl.maximum(a, b) + _log1p(tl.exp(-tl.abs(a - b)))
    else:
        known = log_z
    tl.store(out_ptr, tl.where(_z_unknown(z_ptr), estimate, known))


@triton.jit
def crd_finish_kernel(z_s_ptr, z_t_ptr, lse_ptr, loss_part_ptr, loss_ptr, z_s_out_ptr, z_t_out_ptr,
                      count, loss_count, log_scale, log_m, log_1m, neg_inv_batch,
                      BLOCK: tl.constexpr, MOVING: tl.constexpr):
    """One program: loss = −(1/B)·Σ terms of both sides; new log Z of both sides (estimate, kept or moved:
    ``log_m``, ``log_1m`` = log m, log(1 − m) of the Z momentum m)."""
    tl.store(loss_ptr, _sum(loss_part_ptr, loss_count, BLOCK) * neg_inv_batch)
    _z_new_side(z_s_ptr, lse_ptr, z_s_out_ptr, count, log_scale, log_m, log_1m, BLOCK, MOVING)
    _z_new_side(z_t_ptr, lse_ptr + count * 2, z_t_out_ptr, count, log_scale, log_m, log_1m, BLOCK, MOVING)


@triton.jit
def _reduce_grad_side(part_ptr, out_ptr, b, splits, D, stride_ob, stride_od,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for begin in range(0, splits, BLOCK_S):
        offs_s = begin + tl.arange(0, BLOCK_S)
        ptrs = part_ptr + (b * splits + offs_s[:, None]) * D + offs_d[None, :]
        acc += tl.load(ptrs, mask=(offs_s[:, None] < splits) & d_mask[None, :], other=0.0)
    tl.store(out_ptr + b * stride_ob + offs_d * stride_od, tl.sum(acc, axis=0), mask=d_mask)


@triton.jit
def crd_grad_reduce_kernel(part_s_ptr, part_t_ptr, grad_s_ptr, grad_t_ptr, splits, D_S, D_T,
                           stride_sb, stride_sd, stride_tb, stride_td,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program b: grad[b] = Σ_split part[b, split] for both sides, stored in the anchors' dtype."""
    b = tl.program_id(0)
    _reduce_grad_side(part_s_ptr, grad_s_ptr, b, splits, D_S, stride_sb, stride_sd, BLOCK_S, BLOCK_D)
    _reduce_grad_side(part_t_ptr, grad_t_ptr, b, splits, D_T, stride_tb, stride_td, BLOCK_S, BLOCK_D)


@triton.jit
def crd_bank_update_kernel(bank_ptr, index_ptr, value_ptr, B, N, D,
                           stride_bn, stride_bd, stride_vb, stride_vd, momentum, one_minus_momentum,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program i: bank[y_i] ← rownorm(m·bank[y_i] + (1 − m)·value[i]) unless y_i occurs again later.

    Only the last occurrence of a row reads and writes it, so no program sees a row another one wrote:
    every row is computed from the bank before the call, in one pass, deterministically.
    """
    i = tl.program_id(0)
    row = tl.load(index_ptr + i).to(tl.int64)
    later = 0
    for begin in range(i + 1, B, BLOCK_B):
        offs = begin + tl.arange(0, BLOCK_B)
        other = tl.load(index_ptr + offs, mask=offs < B, other=-1).to(tl.int64)
        later += tl.sum((other == row).to(tl.int32), axis=0)
    active = (later == 0) & (row >= 0) & (row < N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = tl.where(active, offs_d < D, False)
    old = tl.load(bank_ptr + row * stride_bn + offs_d * stride_bd, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(value_ptr + i * stride_vb + offs_d * stride_vd, mask=mask, other=0.0).to(tl.float32)
    mixed = old * momentum + value * one_minus_momentum
    fresh = mixed / tl.where(active, tl.sqrt(tl.sum(mixed * mixed, axis=0)), 1.0)
    tl.store(bank_ptr + row * stride_bn + offs_d * stride_bd, fresh, mask=mask)

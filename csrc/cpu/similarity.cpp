// CPU kernels of the batch-relation ops (fastkd/ops/similarity.py): SP, CCKD, PKT, RKD distance and angle; and
// of IUSP (fastkd/ops/iusp.py), SP's epilogue on each sequence's T x T Gram (see iusp_loss at the end).
//
// Each loss is a function of the Gram matrices G = X X^T ([B, B]) of the student and teacher
// batches. A kernel computes G once per side (gram_matrix: the upper triangle, mirrored; in fp32 for fp16/bf16 inputs),
// then runs the whole elementwise chain of the loss and of its derivative in one fused epilogue
// over the B x B entries, row by row (at::parallel_for), writing straight into the outputs
// M = dL/dG + (dL/dG)^T, so that backward is dL/dX = M X. No other B x B temporary exists, except in RKD's
// angle term (a few B x B matrices of pair quantities, see its section).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace fastkd::cpu {
namespace {

constexpr double kRownormEps = 1e-12;  // F.normalize's eps
constexpr double kDistEps = 1e-12;     // RepDistiller's clamp of squared distances
constexpr int64_t kRowGrain = 8;

// Loss partials, one per row, summed in a fixed order (the result does not depend on threads).
double sum_rows(const std::vector<double>& rows) { return std::accumulate(rows.begin(), rows.end(), 0.0); }

// m <- m + m^T in place, tile by tile: a thread takes a block of kSymTile rows and, for each block of columns
// on or right of the diagonal, the entry pairs (i, j >= i) of that tile and their mirrors (j, i), which it alone
// writes. Both tiles stay in L1: a row-by-row pass reads the mirrors down a column, a cache line per entry, which
// measured ~1 ms per [500, 500] matrix, the most of IUSP's epilogue at T = 500.
constexpr int64_t kSymTile = 32;

template <typename acc_t>
void symmetrize(acc_t* m, int64_t b) {
  const int64_t blocks = (b + kSymTile - 1) / kSymTile;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kSymTile, i1 = std::min(b, i0 + kSymTile);
      for (int64_t j0 = i0; j0 < b; j0 += kSymTile) {
        const int64_t j1 = std::min(b, j0 + kSymTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) {
            const acc_t s = m[i * b + j] + m[j * b + i];
            m[i * b + j] = s;
            m[j * b + i] = s;
          }
        }
      }
      for (int64_t i = i0; i < i1; ++i) m[i * b + i] *= 2;
    }
  });
}

// For c_ij = G_ij / (nu_i nu_j): given M0 = D + D^T of the direct part D_ij = dL/dc_ij / (nu_i nu_j),
// adds the path through nu_i(G_ii): dL/dG_ii += -(sum_j M0_ij G_ij) / nu_i * dnu_i, doubled in M.
template <typename acc_t>
void add_norm_path(acc_t* m, const acc_t* g, const acc_t* nu, const acc_t* dnu, int64_t b) {
  std::vector<acc_t> corr(b);
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t s = 0;
      for (int64_t j = 0; j < b; ++j) s += m[i * b + j] * g[i * b + j];
      corr[i] = -s / nu[i] * dnu[i];
    }
  });
  for (int64_t i = 0; i < b; ++i) m[i * b + i] += 2 * corr[i];
}

// ---- SP -------------------------------------------------------------------------------------

// SP's rows on vec.h's packs: pass 1 the row norms of both Grams; pass 2 the loss terms and the inner products
// <y, y_s - y_t> of the rownorm backward; pass 3 row i of D = dL/dG (M before symmetrize). The lanes past a
// row's end load 0 and add 0. Writes rows[i] = row i's sum of (y_s - y_t)^2.
template <typename acc_t>
struct SpRows {
  static FASTKD_INLINE void run(const acc_t* gs, const acc_t* gt, acc_t* ms, acc_t* mt, int64_t b, acc_t scale,
                                double* rows, int64_t begin, int64_t end) {
    using vec::load;
    using vec::pack;
    using vec::store;
    const acc_t eps = static_cast<acc_t>(kRownormEps), zero = 0;
    for (int64_t i = begin; i < end; ++i) {
      const acc_t *rs = gs + i * b, *rt = gt + i * b;
      pack<acc_t> sq_s = vec::splat(zero), sq_t = sq_s;
      vec::for_packs<acc_t>(b, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        const pack<acc_t> a = load(rs + c, count, zero), t = load(rt + c, count, zero);
        sq_s += a * a;
        sq_t += t * t;
      });
      const acc_t ns = std::sqrt(vec::lane_sum<acc_t>(sq_s)), nt = std::sqrt(vec::lane_sum<acc_t>(sq_t));
      const acc_t inv_s = acc_t(1) / std::max(ns, eps), inv_t = acc_t(1) / std::max(nt, eps);
      pack<acc_t> loss = vec::splat(zero), inner_s = loss, inner_t = loss;
      vec::for_packs<acc_t>(b, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        const pack<acc_t> ys = load(rs + c, count, zero) * inv_s, yt = load(rt + c, count, zero) * inv_t;
        const pack<acc_t> diff = ys - yt;
        loss += diff * diff;
        inner_s += ys * diff;
        inner_t += yt * diff;
      });
      // d/dy_s = scale * diff, d/dy_t = -scale * diff; rownorm backward per row
      const acc_t ps = ns >= eps ? vec::lane_sum<acc_t>(inner_s) : zero;
      const acc_t pt = nt >= eps ? vec::lane_sum<acc_t>(inner_t) : zero;
      const acc_t ks = scale * inv_s, kt = -scale * inv_t;
      vec::for_packs<acc_t>(b, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        const pack<acc_t> ys = load(rs + c, count, zero) * inv_s, yt = load(rt + c, count, zero) * inv_t;
        const pack<acc_t> diff = ys - yt;
        store(ms + i * b + c, (diff - ys * ps) * ks, count);
        store(mt + i * b + c, (diff - yt * pt) * kt, count);
      });
      rows[i] = static_cast<double>(vec::lane_sum<acc_t>(loss));
    }
  }
};

// SP's epilogue on one pair of [b, b] Grams: returns weight * ||rownorm(G_s) - rownorm(G_t)||_F^2 and writes
// M = dL/dG + (dL/dG)^T of that loss into ms / mt (SP: weight 1 / b^2; IUSP: 1 / (B L^2) per sequence).
template <typename acc_t>
double sp_epilogue(const acc_t* gs, const acc_t* gt, acc_t* ms, acc_t* mt, int64_t b, double weight) {
  const acc_t scale = static_cast<acc_t>(2 * weight);
  std::vector<double> rows(b);
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    vec::run_vectorized<SpRows<acc_t>>(gs, gt, ms, mt, b, scale, rows.data(), begin, end);
  });
  symmetrize(ms, b);
  symmetrize(mt, b);
  return sum_rows(rows) * weight;
}

// ---- CCKD / PKT: cosines c_ij = G_ij / (nu_i nu_j) ------------------------------------------

// nu_i and dnu_i / dG_ii of one side: CCKD nu = max(n, 1e-12), PKT nu = n + eps, n = sqrt(G_ii).
template <typename acc_t>
void norms(const acc_t* g, int64_t b, bool additive, acc_t eps, acc_t* nu, acc_t* dnu) {
  for (int64_t i = 0; i < b; ++i) {
    const acc_t n = std::sqrt(std::max(g[i * b + i], acc_t(0)));
    if (additive) {
      nu[i] = n + eps;
      dnu[i] = n > 0 ? acc_t(0.5) / n : acc_t(0);
    } else {
      nu[i] = std::max(n, eps);
      dnu[i] = n >= eps ? acc_t(0.5) / n : acc_t(0);
    }
  }
}

template <typename acc_t>
std::vector<acc_t> reciprocals(const std::vector<acc_t>& v) {
  std::vector<acc_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = acc_t(1) / v[i];
  return out;
}

// CCKD's matrices are symmetric (k and k' of a symmetric c), so only j >= i is computed and mirrored:
// M = D + D^T = 2 D.
template <typename acc_t>
double cckd_epilogue(const acc_t* gs, const acc_t* gt, acc_t* ms, acc_t* mt, int64_t b,
                     const std::vector<double>& coef_d) {
  const int64_t order = static_cast<int64_t>(coef_d.size()) - 1;
  std::vector<acc_t> coef(coef_d.begin(), coef_d.end());
  std::vector<acc_t> nus(b), nut(b), dnus(b), dnut(b);
  const acc_t eps = static_cast<acc_t>(kRownormEps), scale = acc_t(4) / static_cast<acc_t>(b * b);
  norms(gs, b, false, eps, nus.data(), dnus.data());
  norms(gt, b, false, eps, nut.data(), dnut.data());
  const std::vector<acc_t> rs = reciprocals(nus), rt = reciprocals(nut);
  std::vector<double> rows(b);
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t diagonal = 0, off = 0;
      for (int64_t j = i; j < b; ++j) {
        const acc_t inv_s = rs[i] * rs[j], inv_t = rt[i] * rt[j];
        const acc_t cs = gs[i * b + j] * inv_s, ct = gt[i * b + j] * inv_t;
        acc_t ks = coef[order], kt = coef[order];
        acc_t dks = 0, dkt = 0;
        for (int64_t p = order - 1; p >= 0; --p) {  // Horner for k and k' together
          dks = dks * cs + ks;
          dkt = dkt * ct + kt;
          ks = ks * cs + coef[p];
          kt = kt * ct + coef[p];
        }
        const acc_t diff = ks - kt;
        (j == i ? diagonal : off) += diff * diff;
        const acc_t m_s = scale * diff * dks * inv_s, m_t = -scale * diff * dkt * inv_t;
        ms[i * b + j] = m_s;
        ms[j * b + i] = m_s;
        mt[i * b + j] = m_t;
        mt[j * b + i] = m_t;
      }
      rows[i] = static_cast<double>(diagonal) + 2 * static_cast<double>(off);
    }
  });
  add_norm_path(ms, gs, nus.data(), dnus.data(), b);
  add_norm_path(mt, gt, nut.data(), dnut.data(), b);
  return sum_rows(rows) / static_cast<double>(b * b);
}

// PKT's rows, on vec.h's packs: pass 1 S = (c + 1) / 2 (kept in the output rows) and its row sums; pass 2
// P = S / ΣS, the loss terms P_t log((P_t + eps) / (P_s + eps)) and dL/dP; pass 3 back through the row sums,
// S and c = G / (nu_i nu_j). Writes rows[i] = row i's loss; M is finished by the caller.
template <typename acc_t>
struct PktRows {
  // v with the lanes from ``count`` on set to 0 (the padding of a row's last, partial pack)
  static FASTKD_INLINE vec::pack<acc_t> valid(vec::pack<acc_t> v, int64_t count) {
    for (int64_t j = count; j < vec::kWidth<acc_t>; ++j) v[j] = 0;
    return v;
  }

  static FASTKD_INLINE void run(const acc_t* gs, const acc_t* gt, acc_t* ms, acc_t* mt, const acc_t* ris,
                                const acc_t* rit, int64_t b, acc_t eps, acc_t inv_bb, double* rows, int64_t begin,
                                int64_t end) {
    using vec::load;
    using vec::pack;
    using vec::store;
    const acc_t one = 1, half = 0.5;
    for (int64_t i = begin; i < end; ++i) {
      const acc_t *rs = gs + i * b, *rt = gt + i * b;
      acc_t *out_s = ms + i * b, *out_t = mt + i * b;
      const acc_t ri_s = ris[i], ri_t = rit[i];
      pack<acc_t> tot_s = vec::splat(acc_t(0)), tot_t = tot_s;
      vec::for_packs<acc_t>(b, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        const pack<acc_t> ss = (load(rs + c, count, one) * ri_s * load(ris + c, count, one) + one) * half;
        const pack<acc_t> st = (load(rt + c, count, one) * ri_t * load(rit + c, count, one) + one) * half;
        store(out_s + c, ss, count);
        store(out_t + c, st, count);
        tot_s += valid(ss, count);
        tot_t += valid(st, count);
      });
      const acc_t inv_tot_s = one / vec::lane_sum<acc_t>(tot_s), inv_tot_t = one / vec::lane_sum<acc_t>(tot_t);
      pack<acc_t> loss = vec::splat(acc_t(0)), inner_s = loss, inner_t = loss;
      vec::for_packs<acc_t>(b, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        const pack<acc_t> ps = load(out_s + c, count, one) * inv_tot_s;
        const pack<acc_t> pt = load(out_t + c, count, one) * inv_tot_t;
        const pack<acc_t> inv_s = one / (ps + eps), inv_t = one / (pt + eps);
        const pack<acc_t> log_ratio = vec::log_pack((pt + eps) * inv_s);
        const pack<acc_t> dps = -pt * inv_s * inv_bb, dpt = (log_ratio + pt * inv_t) * inv_bb;
        store(out_s + c, dps, count);
        store(out_t + c, dpt, count);
        loss += valid(pt * log_ratio, count);
        inner_s += valid(dps * ps, count);
        inner_t += valid(dpt * pt, count);
      });
      const acc_t sum_s = vec::lane_sum<acc_t>(inner_s), sum_t = vec::lane_sum<acc_t>(inner_t);
      const acc_t k_s = inv_tot_s * half * ri_s, k_t = inv_tot_t * half * ri_t;
      vec::for_packs<acc_t>(b, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        store(out_s + c, (load(out_s + c, count, one) - sum_s) * (k_s * load(ris + c, count, one)), count);
        store(out_t + c, (load(out_t + c, count, one) - sum_t) * (k_t * load(rit + c, count, one)), count);
      });
      rows[i] = static_cast<double>(vec::lane_sum<acc_t>(loss));
    }
  }
};

template <typename acc_t>
double pkt_epilogue(const acc_t* gs, const acc_t* gt, acc_t* ms, acc_t* mt, int64_t b, double eps_d) {
  const acc_t eps = static_cast<acc_t>(eps_d), inv_bb = acc_t(1) / static_cast<acc_t>(b * b);
  std::vector<acc_t> nus(b), nut(b), dnus(b), dnut(b);
  norms(gs, b, true, eps, nus.data(), dnus.data());
  norms(gt, b, true, eps, nut.data(), dnut.data());
  const std::vector<acc_t> ris = reciprocals(nus), rit = reciprocals(nut);
  std::vector<double> rows(b);
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    vec::run_vectorized<PktRows<acc_t>>(gs, gt, ms, mt, ris.data(), rit.data(), b, eps, inv_bb, rows.data(), begin,
                                        end);
  });
  symmetrize(ms, b);
  symmetrize(mt, b);
  add_norm_path(ms, gs, nus.data(), dnus.data(), b);
  add_norm_path(mt, gt, nut.data(), dnut.data(), b);
  return sum_rows(rows) / static_cast<double>(b * b);
}

// ---- RKD distance ---------------------------------------------------------------------------
// Every matrix here is symmetric (d, u, v), so the passes run over j > i only: d_ii = 0 contributes
// nothing, and the off-diagonal entries count twice.

// d_ij = sqrt(max(G_ii + G_jj - 2 G_ij, eps)) for j > i into d's upper triangle; returns the sum over
// all i != j. Every off-diagonal distance is at least sqrt(eps) > 0, so all b (b - 1) of them count.
template <typename acc_t>
double upper_distances(const acc_t* g, acc_t* d, int64_t b) {
  std::vector<double> sums(b);
  const acc_t eps = static_cast<acc_t>(kDistEps);
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gii = g[i * b + i];
      acc_t s = 0;
      for (int64_t j = i + 1; j < b; ++j) {
        const acc_t dij = std::sqrt(std::max(gii + g[j * b + j] - 2 * g[i * b + j], eps));
        d[i * b + j] = dij;
        s += dij;
      }
      sums[i] = static_cast<double>(s);
    }
  });
  return 2 * sum_rows(sums);
}

template <typename acc_t>
double rkd_distance_epilogue(const acc_t* gs, const acc_t* gt, acc_t* ms, int64_t b) {
  std::vector<acc_t> dt(b * b);
  const double count = static_cast<double>(b * (b - 1));
  const double mu_s = upper_distances(gs, ms, b) / count;  // d_s, kept in ms's upper triangle until pass 2
  const double mu_t = upper_distances(gt, dt.data(), b) / count;
  const acc_t inv_mu_s = static_cast<acc_t>(1 / mu_s), inv_mu_t = static_cast<acc_t>(1 / mu_t);
  const acc_t inv_bb = acc_t(1) / static_cast<acc_t>(b * b);
  std::vector<double> rows(b), weighted(b);
  // pass 1: loss, u = dL/d(d_s / mu_s) (into dt's upper triangle) and sum u d_s
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* ds = ms + i * b;
      acc_t* u = dt.data() + i * b;
      acc_t loss = 0, w = 0;
      for (int64_t j = i + 1; j < b; ++j) {
        const acc_t x = ds[j] * inv_mu_s - u[j] * inv_mu_t, ax = std::abs(x);
        loss += ax < 1 ? acc_t(0.5) * x * x : ax - acc_t(0.5);
        u[j] = std::min(std::max(x, acc_t(-1)), acc_t(1)) * inv_bb;
        w += u[j] * ds[j];
      }
      rows[i] = 2 * static_cast<double>(loss);
      weighted[i] = 2 * static_cast<double>(w);
    }
  });
  const acc_t through_mu = static_cast<acc_t>(sum_rows(weighted) / (mu_s * mu_s * count));
  // pass 2: v = dL/d(d^2) = (u / mu_s - through_mu) / (2 d_s) where the clamp passes; with
  // d^2_ij = G_ii + G_jj - 2 G_ij and V = v + v^T = 2v: M_ij = M_ji = -4 v_ij, then M_ii = -sum_j M_ij
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gii = gs[i * b + i];
      const acc_t* u = dt.data() + i * b;
      ms[i * b + i] = 0;
      for (int64_t j = i + 1; j < b; ++j) {
        const acc_t d2 = gii + gs[j * b + j] - 2 * gs[i * b + j];
        const acc_t v = d2 >= static_cast<acc_t>(kDistEps) ? (u[j] * inv_mu_s - through_mu) / (2 * ms[i * b + j]) : 0;
        ms[i * b + j] = -4 * v;
        ms[j * b + i] = -4 * v;
      }
    }
  });
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t s = 0;
      for (int64_t j = 0; j < b; ++j) s += ms[i * b + j];
      ms[i * b + i] = -s;
    }
  });
  return sum_rows(rows) / static_cast<double>(b * b);
}

// ---- RKD angle ------------------------------------------------------------------------------
// fastkd::rkd_angle_loss (contract: rkd_angle_with_grad_reference in fastkd/ops/similarity.py, whose
// comment derives the formulas used here).
//
// For anchor i, a_ijk = <e_ij, e_ik> = (q_ij + q_ik - q_jk) / 2 * r_ij r_ik with q = the squared distances
// G_ii + G_jj - 2 G_ij of the Gram matrix G = X X^T (one GEMM per side) and r_ij = 1 / max(sqrt(q_ij), 1e-12);
// pairs whose q is at rounding level of G_ii + G_jj (duplicated rows, and i = j) are zero differences
// (q = r = 0). So the B^3 angles come from B x B matrices, and nothing of size B x B x D or B^3 exists:
//
//   pass 0 (rows i): q, r and rho = r^2 (where the eps clamp passes) of both sides, B x B each, made exactly
//     symmetric (from G's upper triangle) so that a_ijk = a_ikj;
//   pass 1 (rows p): the loss of anchor p and row p of U = dL/dq in two parts. As the anchor of triangles
//     (p, j, k): u1_pj = sum_k g_pjk (r_pj r_pk - rho_pj a_pjk), over k >= j only, each k > j also giving
//     u1_pk its term. As a corner of the far side (p, k) of triangles (i, p, k): u2_pk = -1/2 sum_i g_ipk r_ip
//     r_ik, symmetric in (p, k), so for k > p only. The angles are computed twice (B^3 evaluations in all),
//     but every row of u1, u2 has one owner, so the sums are in a fixed order whatever the thread count;
//   pass 2: M = dL/dG + (dL/dG)^T from U = u1 + u2 (q_ij = G_ii + G_jj - 2 G_ij): with V = U + U^T,
//     M_ij = -2 V_ij off the diagonal, M_ii = 2 sum_j V_ij.
//
// Reductions along k run in kLanes independent partial sums added in a fixed order (shorter dependency chains);
// a row's loss is summed in double and the rows in index order. (Built without -fno-trapping-math, GCC keeps
// these loops scalar; vectorised with SSE2 by that flag they measured slower here, 1.04 vs 0.79 ms at b = 64.)

constexpr double kZeroTol = 32;     // q_ij <= 32 eps (G_ii + G_jj): a zero difference (RKD_ANGLE_ZERO_TOL)
constexpr int64_t kAngleRowGrain = 4;  // rows per task: each row costs O(B^2)
constexpr int64_t kLanes = 8;

// q, r and (unless null) rho of one side (B x B each, row-major): zero differences get q = r = rho = 0.
template <typename acc_t>
void pairs(const acc_t* g, int64_t b, acc_t* q, acc_t* r, acc_t* rho) {
  const acc_t tol = static_cast<acc_t>(kZeroTol) * std::numeric_limits<acc_t>::epsilon();
  const acc_t eps = static_cast<acc_t>(kRownormEps);
  at::parallel_for(0, b, kAngleRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gii = g[i * b + i];
      for (int64_t j = 0; j < b; ++j) {
        const acc_t gij = i < j ? g[i * b + j] : g[j * b + i];  // exactly symmetric q, r: a_ijk = a_ikj
        const acc_t both = gii + g[j * b + j], qij = both - 2 * gij;
        const bool zero = j == i || qij <= tol * both;
        const acc_t n = std::sqrt(std::max(qij, acc_t(0)));
        const acc_t rij = zero ? acc_t(0) : acc_t(1) / std::max(n, eps);
        q[i * b + j] = zero ? acc_t(0) : qij;
        r[i * b + j] = rij;
        if (rho != nullptr) rho[i * b + j] = !zero && n >= eps ? rij * rij : acc_t(0);
      }
    }
  });
}

template <typename acc_t>
struct Side {
  const acc_t* q;
  const acc_t* r;
};

// The angle a_ijk = (q_ij + q_ik - q_jk) * (r_ij / 2) * r_ik, given q_ij, r_ij / 2 and rows i and j of q, r.
template <typename acc_t>
inline acc_t angle(acc_t qij, acc_t half_rij, acc_t qik, acc_t qjk, acc_t rik) {
  return (qij + qik - qjk) * half_rij * rik;
}

// clamp(x, -1, 1) and smooth-L1 (beta 1) as m (|x| - m / 2), m = min(|x|, 1): selects of values, no branches.
template <typename acc_t>
inline acc_t clamp1(acc_t x) {
  const acc_t low = x > acc_t(-1) ? x : acc_t(-1);
  return low < acc_t(1) ? low : acc_t(1);
}

template <typename acc_t>
inline acc_t smooth_l1(acc_t x) {
  const acc_t ax = std::abs(x), m = ax < acc_t(1) ? ax : acc_t(1);
  return m * (ax - acc_t(0.5) * m);
}

// Anchor p, pair j, the pairs k > j (a_pjk = a_pkj, so each stands for two): adds the loss terms (doubled) to
// *loss and the anchor part of dL/dq, unscaled, to u1: u1_pj += sum_k g (r_pj r_pk - a^s rho_pj) (a reduction
// over k) and u1_pk += g (r_pj r_pk - a^s rho_pk), with g = clamp(a^s - a^t, +-1).
template <typename acc_t>
void anchor_pairs(const Side<acc_t>& s, const Side<acc_t>& t, const acc_t* rho, int64_t b, int64_t p, int64_t j,
                  acc_t* u1, double* loss) {
  const acc_t* qsp = s.q + p * b;
  const acc_t* qsj = s.q + j * b;
  const acc_t* rsp = s.r + p * b;
  const acc_t* qtp = t.q + p * b;
  const acc_t* qtj = t.q + j * b;
  const acc_t* rtp = t.r + p * b;
  const acc_t* rhop = rho + p * b;
  const acc_t qs = qsp[j], rs = rsp[j], hs = acc_t(0.5) * rs, qt = qtp[j], ht = acc_t(0.5) * rtp[j], rh = rhop[j];
  acc_t lanes_loss[kLanes] = {}, lanes_u[kLanes] = {};
  auto step = [&](int64_t k, int64_t l) {
    const acc_t as = angle(qs, hs, qsp[k], qsj[k], rsp[k]);
    const acc_t x = as - angle(qt, ht, qtp[k], qtj[k], rtp[k]);
    const acc_t g = clamp1(x), rr = rs * rsp[k];
    lanes_loss[l] += smooth_l1(x);
    lanes_u[l] += g * (rr - as * rh);
    u1[k] += g * (rr - as * rhop[k]);
  };
  const int64_t first = j + 1, full = first + (b - first) / kLanes * kLanes;
  for (int64_t k0 = first; k0 < full; k0 += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) step(k0 + l, l);
  }
  for (int64_t k = full; k < b; ++k) step(k, k - full);
  // k = j: a_pjj = q_pj r_pj^2 (1 unless the pair is a zero difference or under the eps clamp)
  const acc_t as = angle(qs, hs, qs, acc_t(0), rs), x = as - angle(qt, ht, qt, acc_t(0), rtp[j]);
  acc_t total_loss = smooth_l1(x), total_u = clamp1(x) * (rs * rs - as * rh);
  acc_t off_loss = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    off_loss += lanes_loss[l];
    total_u += lanes_u[l];
  }
  u1[j] += total_u;
  *loss += static_cast<double>(total_loss) + 2 * static_cast<double>(off_loss);
}

// Corner p of the far side (p, k > p) of anchor i's triangles: acc_k += g_ipk r^s_ip r^s_ik (symmetric in p, k).
template <typename acc_t>
void far_side(const Side<acc_t>& s, const Side<acc_t>& t, int64_t b, int64_t i, int64_t p, acc_t* acc) {
  const acc_t* qsi = s.q + i * b;
  const acc_t* qsp = s.q + p * b;
  const acc_t* rsi = s.r + i * b;
  const acc_t* qti = t.q + i * b;
  const acc_t* qtp = t.q + p * b;
  const acc_t* rti = t.r + i * b;
  const acc_t qs = qsi[p], hs = acc_t(0.5) * rsi[p], qt = qti[p], ht = acc_t(0.5) * rti[p], rip = rsi[p];
  for (int64_t k = p + 1; k < b; ++k) {
    const acc_t x = angle(qs, hs, qsi[k], qsp[k], rsi[k]) - angle(qt, ht, qti[k], qtp[k], rti[k]);
    acc[k] += clamp1(x) * rsi[k] * rip;
  }
}

template <typename acc_t>
double rkd_angle_epilogue(const acc_t* gs, const acc_t* gt, acc_t* ms, int64_t b) {
  std::vector<acc_t> qs(b * b), rs(b * b), rhos(b * b), qt(b * b), rt(b * b), u1(b * b), u2(b * b);
  pairs(gs, b, qs.data(), rs.data(), rhos.data());
  pairs(gt, b, qt.data(), rt.data(), static_cast<acc_t*>(nullptr));
  const Side<acc_t> s{qs.data(), rs.data()}, t{qt.data(), rt.data()};
  std::vector<double> rows(b);
  at::parallel_for(0, b, kAngleRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      acc_t* up = u1.data() + p * b;
      std::fill(up, up + b, acc_t(0));
      double loss = 0;
      for (int64_t j = 0; j < b; ++j) {
        // a zero difference on both sides: anchor p's angles with j are 0 - 0
        if (rs[p * b + j] != 0 || rt[p * b + j] != 0) anchor_pairs(s, t, rhos.data(), b, p, j, up, &loss);
      }
      rows[p] = loss;
      acc_t* far = u2.data() + p * b;  // its entries k > p
      std::fill(far + p + 1, far + b, acc_t(0));
      for (int64_t i = 0; i < b; ++i) {
        if (rs[i * b + p] != 0) far_side(s, t, b, i, p, far);
      }
      for (int64_t k = p + 1; k < b; ++k) far[k] = rs[p * b + k] != 0 ? acc_t(-0.5) * far[k] : acc_t(0);
    }
  });
  // U = u1 + u2 (u2 symmetric, kept in its upper triangle); M from V = U + U^T, scaled by 1 / B^3
  const acc_t scale = acc_t(1) / static_cast<acc_t>(b * b * b);
  at::parallel_for(0, b, kAngleRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t total = 0;
      for (int64_t j = 0; j < b; ++j) {
        const acc_t far = i < j ? u2[i * b + j] : j < i ? u2[j * b + i] : acc_t(0);
        const acc_t v = (u1[i * b + j] + u1[j * b + i] + 2 * far) * scale;
        ms[i * b + j] = -2 * v;
        total += v;
      }
      ms[i * b + i] = 2 * total;
    }
  });
  return sum_rows(rows) / static_cast<double>(b * b * b);
}

void check_relation_pair(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": the CPU kernel needs CPU tensors");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": expected [B, D] inputs, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0), op, ": student and teacher batch sizes differ (", a.size(0), " vs ", b.size(0), ")");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": student and teacher dtypes differ");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": expected floating-point inputs, got ", a.scalar_type());
}

at::Tensor relation_gram(const at::Tensor& x) {
  return gram_matrix(as_dtype(x, x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

// Runs ``epilogue(gs, gt, ms, mt, b)`` on the two Gram matrices; returns (loss, m_s, m_t).
template <typename Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> relation(const char* op, const at::Tensor& f_s, const at::Tensor& f_t,
                                                        Epilogue&& epilogue) {
  check_relation_pair(op, f_s, f_t);
  const at::Tensor gs = relation_gram(f_s), gt = relation_gram(f_t);
  at::Tensor ms = at::empty_like(gs), mt = at::empty_like(gt);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "relation_epilogue", [&] {
    loss = epilogue(gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), ms.data_ptr<scalar_t>(),
                    mt.data_ptr<scalar_t>(), f_s.size(0));
  });
  return {at::scalar_tensor(loss, gs.options()), ms, mt};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sp_loss(const at::Tensor& f_s, const at::Tensor& f_t) {
  return relation("sp_loss", f_s, f_t, [](auto* gs, auto* gt, auto* ms, auto* mt, int64_t b) {
    return sp_epilogue(gs, gt, ms, mt, b, 1.0 / static_cast<double>(b * b));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cckd_loss(const at::Tensor& e_s, const at::Tensor& e_t, double gamma,
                                                         int64_t order) {
  TORCH_CHECK(order >= 0, "cckd_loss: order must be >= 0, got ", order);
  std::vector<double> coef(order + 1);
  double term = std::exp(-2 * gamma);
  for (int64_t p = 0; p <= order; ++p) {
    coef[p] = term;
    term *= 2 * gamma / static_cast<double>(p + 1);
  }
  return relation("cckd_loss", e_s, e_t, [&](auto* gs, auto* gt, auto* ms, auto* mt, int64_t b) {
    return cckd_epilogue(gs, gt, ms, mt, b, coef);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pkt_loss(const at::Tensor& f_s, const at::Tensor& f_t, double eps) {
  return relation("pkt_loss", f_s, f_t, [&](auto* gs, auto* gt, auto* ms, auto* mt, int64_t b) {
    return pkt_epilogue(gs, gt, ms, mt, b, eps);
  });
}

std::tuple<at::Tensor, at::Tensor> rkd_distance_loss(const at::Tensor& f_s, const at::Tensor& f_t) {
  auto [loss, ms, mt] = relation("rkd_distance_loss", f_s, f_t, [](auto* gs, auto* gt, auto* ms, auto*, int64_t b) {
    return rkd_distance_epilogue(gs, gt, ms, b);
  });
  return {loss, ms};
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_loss(const at::Tensor& f_s, const at::Tensor& f_t) {
  auto [loss, ms, mt] = relation("rkd_angle_loss", f_s, f_t, [](auto* gs, auto* gt, auto* ms, auto*, int64_t b) {
    return rkd_angle_epilogue(gs, gt, ms, b);
  });
  return {loss, ms};
}

// IUSP: for each sequence b, the Grams of its first L_b frames ([L_b, L_b]) and SP's epilogue on them with weight
// 1 / (B L_b^2), written straight into M's slice [b] when L_b = T (no padding) and through an [L_b, L_b] buffer
// into the zeroed slice otherwise. The sequences run one after the other (each Gram and epilogue uses the threads
// itself) and their losses are added in order. The Grams are at::mm's, not gram_matrix's: its symmetric kernel is
// tuned for SP's short, wide batches (tens to hundreds of rows of up to ~100k features); on one pair of a sequence's
// frames (T = 500 rows of C = 512 / 1,024) SP's op, whose epilogue takes ~0.8 ms there, took 4.5 / 11.4 ms against
// 2.6 / 5.3 ms for the two at::mm calls alone (1 thread, a loaded 2-core machine): its Grams ~1.4x / 2x at::mm's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> iusp_loss(const at::Tensor& f_s, const at::Tensor& f_t,
                                                         const at::Tensor& lengths) {
  TORCH_CHECK(f_s.device().is_cpu() && f_t.device().is_cpu() && lengths.device().is_cpu(),
              "iusp_loss: the CPU kernel needs CPU tensors");
  TORCH_CHECK(f_s.dim() == 3 && f_t.dim() == 3, "iusp_loss: expected [B, T, C] inputs, got ", f_s.sizes(), " and ",
              f_t.sizes());
  TORCH_CHECK(f_s.size(0) == f_t.size(0) && f_s.size(1) == f_t.size(1),
              "iusp_loss: student and teacher differ in B or T (", f_s.sizes(), " vs ", f_t.sizes(), ")");
  TORCH_CHECK(f_s.scalar_type() == f_t.scalar_type(), "iusp_loss: student and teacher dtypes differ");
  TORCH_CHECK(at::isFloatingType(f_s.scalar_type()), "iusp_loss: expected floating-point inputs, got ",
              f_s.scalar_type());
  const int64_t batch = f_s.size(0), frames = f_s.size(1);
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == batch,
              "iusp_loss: lengths must be int64 [B], got ", lengths.scalar_type(), " ", lengths.sizes());
  const at::Tensor len = as_contiguous(lengths);
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= frames, "iusp_loss: lengths[", b, "] = ", lp[b], " is outside [1, ", frames,
                "]");
  const at::ScalarType acc = f_s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xs = as_dtype(f_s, acc), xt = as_dtype(f_t, acc);
  at::Tensor ms = at::empty({batch, frames, frames}, xs.options());
  at::Tensor mt = at::empty_like(ms);
  double loss = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = lp[b];
    const at::Tensor qs = xs.select(0, b).narrow(0, 0, n), qt = xt.select(0, b).narrow(0, 0, n);
    const at::Tensor gs = at::mm(qs, qs.t()), gt = at::mm(qt, qt.t());
    const bool whole = n == frames;
    at::Tensor out_s = whole ? ms.select(0, b) : at::empty({n, n}, ms.options());
    at::Tensor out_t = whole ? mt.select(0, b) : at::empty({n, n}, mt.options());
    const double weight = 1.0 / (static_cast<double>(batch) * static_cast<double>(n) * static_cast<double>(n));
    AT_DISPATCH_FLOATING_TYPES(acc, "iusp_epilogue", [&] {
      loss += sp_epilogue(gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), out_s.data_ptr<scalar_t>(),
                          out_t.data_ptr<scalar_t>(), n, weight);
    });
    if (!whole) {
      ms.select(0, b).zero_().narrow(0, 0, n).narrow(1, 0, n).copy_(out_s);
      mt.select(0, b).zero_().narrow(0, 0, n).narrow(1, 0, n).copy_(out_t);
    }
  }
  return {at::scalar_tensor(loss, ms.options()), ms, mt};
}

}  // namespace fastkd::cpu

// CPU kernel of RKD's angle term, fastkd::rkd_angle_loss (contract: rkd_angle_with_grad_reference in
// fastkd/ops/similarity.py, whose comment derives the formulas used here).
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


namespace fastkd::cpu {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps on the norms of the differences
constexpr double kZeroTol = 32;     // q_ij <= 32 eps (G_ii + G_jj): a zero difference (RKD_ANGLE_ZERO_TOL)
constexpr int64_t kRowGrain = 4;
constexpr int64_t kLanes = 8;

// q, r and (unless null) rho of one side (B x B each, row-major): zero differences get q = r = rho = 0.
template <typename acc_t>
void pairs(const acc_t* g, int64_t b, acc_t* q, acc_t* r, acc_t* rho) {
  const acc_t tol = static_cast<acc_t>(kZeroTol) * std::numeric_limits<acc_t>::epsilon();
  const acc_t eps = static_cast<acc_t>(kNormEps);
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
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
  return std::accumulate(rows.begin(), rows.end(), 0.0) / static_cast<double>(b * b * b);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rkd_angle_loss(const at::Tensor& f_s, const at::Tensor& f_t) {
  check_relation_pair("rkd_angle_loss", f_s, f_t);
  const at::Tensor gs = relation_gram(f_s), gt = relation_gram(f_t);
  at::Tensor ms = at::empty_like(gs);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_epilogue", [&] {
    loss = rkd_angle_epilogue(gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), ms.data_ptr<scalar_t>(), f_s.size(0));
  });
  return {at::scalar_tensor(loss, gs.options()), ms};
}

}  // namespace fastkd::cpu

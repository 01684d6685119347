// CPU kernel of RKD's angle term, fastkd::rkd_angle_loss (contract: rkd_angle_with_grad_reference in
// fastkd/ops/similarity.py, whose comment derives the formulas used here).
//
// For anchor i, a_ijk = <e_ij, e_ik> = (q_ij + q_ik - q_jk) / 2 * r_ij r_ik with q = the squared distances
// G_ii + G_jj - 2 G_ij of the Gram matrix G = X X^T (one GEMM per side) and r_ij = 1 / max(sqrt(q_ij), 1e-12);
// pairs whose q is at rounding level of G_ii + G_jj (duplicated rows, and i = j) are zero differences
// (q = r = 0). So the B^3 angles come from B x B matrices, and nothing of size B x B x D or B^3 exists:
//
//   pass 0 (rows i): q, r and rho = r^2 (where the eps clamp passes) of both sides, B x B each;
//   pass 1 (rows p): the loss of anchor p, and row p of U = dL/dq: p as the anchor of triangles (p, j, k)
//     gives U_pj = r_pj sum_k g_pjk r_pk - rho_pj sum_k g_pjk a_pjk; p as a corner of the far side of
//     triangles (i, p, k) gives U_pk -= 1/2 sum_i g_ipk r_ip r_ik (the angles recomputed: twice B^3 work,
//     but every row of U has one owner, so the sums are in a fixed order whatever the thread count);
//   pass 2: M = dL/dG + (dL/dG)^T from U (q_ij = G_ii + G_jj - 2 G_ij): M_ij = -2 (U_ij + U_ji) off the
//     diagonal, M_ii = 2 sum_j (U_ij + U_ji).
//
// Reductions along k run in kLanes independent partial sums (so that the compiler vectorises them) added in a
// fixed order; a row's loss is summed in double and the rows in index order.
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

void check_inputs(const at::Tensor& f_s, const at::Tensor& f_t) {
  TORCH_CHECK(f_s.device().is_cpu() && f_t.device().is_cpu(), "rkd_angle_loss: the CPU kernel needs CPU tensors");
  TORCH_CHECK(f_s.dim() == 2 && f_t.dim() == 2, "rkd_angle_loss: expected [B, D] inputs, got ", f_s.sizes(), " and ",
              f_t.sizes());
  TORCH_CHECK(f_s.size(0) == f_t.size(0), "rkd_angle_loss: student and teacher batch sizes differ (", f_s.size(0),
              " vs ", f_t.size(0), ")");
  TORCH_CHECK(f_s.scalar_type() == f_t.scalar_type(), "rkd_angle_loss: student and teacher dtypes differ");
  TORCH_CHECK(at::isFloatingType(f_s.scalar_type()), "rkd_angle_loss: expected floating-point inputs, got ",
              f_s.scalar_type());
}

// G = X X^T in fp32 (fp64 for fp64 X).
at::Tensor gram(const at::Tensor& x) {
  const at::Tensor q = as_contiguous(as_dtype(x, x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  return at::mm(q, q.t());
}

// q, r and (unless null) rho of one side (B x B each, row-major): zero differences get q = r = rho = 0.
template <typename acc_t>
void pairs(const acc_t* g, int64_t b, acc_t* q, acc_t* r, acc_t* rho) {
  const acc_t tol = static_cast<acc_t>(kZeroTol) * std::numeric_limits<acc_t>::epsilon();
  const acc_t eps = static_cast<acc_t>(kNormEps);
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gii = g[i * b + i];
      for (int64_t j = 0; j < b; ++j) {
        const acc_t both = gii + g[j * b + j], qij = both - 2 * g[i * b + j];
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

template <typename acc_t>
inline acc_t clamp1(acc_t x) {
  return std::min(std::max(x, acc_t(-1)), acc_t(1));
}

template <typename acc_t>
inline acc_t smooth_l1(acc_t x) {
  const acc_t ax = std::abs(x);
  return ax < 1 ? acc_t(0.5) * x * x : ax - acc_t(0.5);
}

// Anchor i, pair j: (sum_k smooth-L1(a^s - a^t), sum_k g r^s_ik, sum_k g a^s) with g = clamp(a^s - a^t, +-1).
template <typename acc_t>
void anchor_pair(const Side<acc_t>& s, const Side<acc_t>& t, int64_t b, int64_t i, int64_t j, acc_t out[3]) {
  const acc_t* qsi = s.q + i * b;
  const acc_t* qsj = s.q + j * b;
  const acc_t* rsi = s.r + i * b;
  const acc_t* qti = t.q + i * b;
  const acc_t* qtj = t.q + j * b;
  const acc_t* rti = t.r + i * b;
  const acc_t qs = qsi[j], hs = acc_t(0.5) * rsi[j], qt = qti[j], ht = acc_t(0.5) * rti[j];
  acc_t loss[kLanes] = {}, grs[kLanes] = {}, gas[kLanes] = {};
  const int64_t full = b - b % kLanes;
  auto step = [&](int64_t k, int64_t l) {
    const acc_t as = angle(qs, hs, qsi[k], qsj[k], rsi[k]);
    const acc_t x = as - angle(qt, ht, qti[k], qtj[k], rti[k]);
    const acc_t g = clamp1(x);
    loss[l] += smooth_l1(x);
    grs[l] += g * rsi[k];
    gas[l] += g * as;
  };
  for (int64_t k0 = 0; k0 < full; k0 += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) step(k0 + l, l);
  }
  for (int64_t k = full; k < b; ++k) step(k, k - full);
  out[0] = out[1] = out[2] = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    out[0] += loss[l];
    out[1] += grs[l];
    out[2] += gas[l];
  }
}

// Corner p of the far side of anchor i's triangles (i, p, k): acc_k += g_ipk r^s_ip r^s_ik.
template <typename acc_t>
void far_side(const Side<acc_t>& s, const Side<acc_t>& t, int64_t b, int64_t i, int64_t p, acc_t* acc) {
  const acc_t* qsi = s.q + i * b;
  const acc_t* qsp = s.q + p * b;
  const acc_t* rsi = s.r + i * b;
  const acc_t* qti = t.q + i * b;
  const acc_t* qtp = t.q + p * b;
  const acc_t* rti = t.r + i * b;
  const acc_t qs = qsi[p], hs = acc_t(0.5) * rsi[p], qt = qti[p], ht = acc_t(0.5) * rti[p], rip = rsi[p];
  for (int64_t k = 0; k < b; ++k) {
    const acc_t x = angle(qs, hs, qsi[k], qsp[k], rsi[k]) - angle(qt, ht, qti[k], qtp[k], rti[k]);
    acc[k] += clamp1(x) * rsi[k] * rip;
  }
}

template <typename acc_t>
double rkd_angle_epilogue(const acc_t* gs, const acc_t* gt, acc_t* ms, int64_t b) {
  std::vector<acc_t> qs(b * b), rs(b * b), rhos(b * b), qt(b * b), rt(b * b), u(b * b);
  pairs(gs, b, qs.data(), rs.data(), rhos.data());
  pairs(gt, b, qt.data(), rt.data(), static_cast<acc_t*>(nullptr));
  const Side<acc_t> s{qs.data(), rs.data()}, t{qt.data(), rt.data()};
  const acc_t inv_b3 = acc_t(1) / static_cast<acc_t>(b * b * b);
  std::vector<double> rows(b);
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> far(b);
    for (int64_t p = begin; p < end; ++p) {
      acc_t* up = u.data() + p * b;
      double loss = 0;
      for (int64_t j = 0; j < b; ++j) {
        acc_t sums[3];
        anchor_pair(s, t, b, p, j, sums);
        loss += static_cast<double>(sums[0]);
        up[j] = (rs[p * b + j] * sums[1] - rhos[p * b + j] * sums[2]) * inv_b3;
      }
      std::fill(far.begin(), far.end(), acc_t(0));
      for (int64_t i = 0; i < b; ++i) {
        if (rs[i * b + p] != 0) far_side(s, t, b, i, p, far.data());
      }
      for (int64_t k = 0; k < b; ++k) {
        if (rs[p * b + k] != 0) up[k] -= acc_t(0.5) * far[k] * inv_b3;
      }
      rows[p] = loss;
    }
  });
  at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t total = 0;
      for (int64_t j = 0; j < b; ++j) {
        const acc_t v = u[i * b + j] + u[j * b + i];
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
  check_inputs(f_s, f_t);
  const at::Tensor gs = gram(f_s), gt = gram(f_t);
  at::Tensor ms = at::empty_like(gs);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_epilogue", [&] {
    loss = rkd_angle_epilogue(gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), ms.data_ptr<scalar_t>(), f_s.size(0));
  });
  return {at::scalar_tensor(loss, gs.options()), ms};
}

}  // namespace fastkd::cpu

// CPU kernels of the logit losses KD and DKD (fastkd::kd_loss, fastkd::dkd_loss and their backward ops).
//
// The formulas and the torch contract are in fastkd/ops/logits.py. Rows are spread over threads with
// at::parallel_for; each row is scaled into fp32 (fp64 for double logits) buffers once, then reduced in
// a few passes that stay in cache: forward = max, Σ exp, KL terms (2 exponentials per class);
// backward = one pass (2 exponentials per class). Nothing of size B×C is allocated besides the gradients.
//
// The inner loops run on the packs of vec.h (a branch-free polynomial exponential), compiled for AVX2 + FMA
// and for the baseline ISA and picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace fastkd::cpu {
namespace {

using namespace vec;

// Stands in for the target class where a loop must skip it: exp(kMasked − m) is 0 and differences stay finite.
constexpr double kMasked = -1e30;
constexpr double kTargetShift = 1000.0;  // mdistiller's −1000 on the target logit (NCKD)
// Elements a thread should get at least before the rows are split.
constexpr int64_t kGrainElements = 16384;

template <typename acc_t>
FASTKD_INLINE acc_t log_add_exp(acc_t a, acc_t b) {
  const acc_t top = a > b ? a : b;
  return top + std::log1p(std::exp(-std::abs(a - b)));
}

// z[c] = x[c] / T for one row, in the accumulation type.
template <typename scalar_t, typename acc_t>
FASTKD_INLINE void load_scaled(const scalar_t* x, int64_t n, acc_t inv_t, acc_t* z) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for_packs<acc_t>(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
      store(z + c, load(x + c, count, acc_t(0)) * inv_t, count);
    });
  } else {
    for (int64_t c = 0; c < n; ++c) z[c] = static_cast<acc_t>(x[c]) * inv_t;
  }
}

template <typename acc_t>
FASTKD_INLINE acc_t row_max(const acc_t* z, int64_t n) {
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  pack<acc_t> top = splat(lowest);
  for_packs<acc_t>(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
    const pack<acc_t> v = load(z + c, count, lowest);
    top = top < v ? v : top;
  });
  acc_t best = top[0];
  for (int j = 1; j < kWidth<acc_t>; ++j) best = best < top[j] ? top[j] : best;
  return best;
}

// Σ_c exp(scale·z[c] − shift); with kStore, e[c] = exp(scale·z[c] − shift) too.
template <bool kStore, typename acc_t>
FASTKD_INLINE acc_t sum_exp(const acc_t* z, int64_t n, acc_t scale, acc_t shift, acc_t* e) {
  pack<acc_t> total = splat(acc_t(0));
  for_packs<acc_t>(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
    const pack<acc_t> v =
        exp_pack(load(z + c, count, -std::numeric_limits<acc_t>::infinity()) * scale - shift);
    if (kStore) store(e + c, v, count);
    total += v;
  });
  return lane_sum<acc_t>(total);
}

// log Σ_c exp(z[c]) (a row of at least one finite value); e[c] = exp(z[c] − max) on return.
template <typename acc_t>
FASTKD_INLINE acc_t log_sum_exp(const acc_t* z, int64_t n, acc_t* e) {
  const acc_t top = row_max(z, n);
  return top + std::log(sum_exp<true>(z, n, acc_t(1), top, e));
}

// Σ_c w[c]·((scale·a[c] − a0) − (scale·b[c] − b0)): the expectation under w of a log-ratio.
template <typename acc_t>
FASTKD_INLINE acc_t weighted_log_ratio(const acc_t* w, const acc_t* a, acc_t a0, const acc_t* b, acc_t b0,
                                       acc_t scale, int64_t n) {
  pack<acc_t> total = splat(acc_t(0));
  for_packs<acc_t>(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
    const pack<acc_t> log_ratio =
        (load(a + c, count, acc_t(0)) * scale - a0) - (load(b + c, count, acc_t(0)) * scale - b0);
    total += load(w + c, count, acc_t(0)) * log_ratio;
  });
  return lane_sum<acc_t>(total);
}

// The row of z = x / T that the loops read: x itself when it has the accumulation type (the loops then
// multiply by scale = 1/T), else x converted and scaled into ``buffer`` (scale = 1).
template <typename scalar_t, typename acc_t>
FASTKD_INLINE const acc_t* scaled_row(const scalar_t* x, int64_t n, acc_t inv_t, acc_t* buffer, acc_t& scale) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    scale = inv_t;
    return x;
  } else {
    load_scaled(x, n, inv_t, buffer);
    scale = acc_t(1);
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
FASTKD_INLINE void store_row(const acc_t* src, int64_t n, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(out, src, sizeof(acc_t) * n);
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(src[c]);
  }
}

// Row b of z = x / T on both sides, as the loops read it (see scaled_row; buffers: buf's first two rows), and
// the rows' maxima as the exponentials see them (scale·max z).
template <typename scalar_t, typename acc_t>
struct KdRow {
  const acc_t *zs, *zt;
  acc_t scale, top_s, top_t;
  FASTKD_INLINE KdRow(const scalar_t* xs, const scalar_t* xt, int64_t b, int64_t classes, acc_t inv_t, acc_t* buf) {
    zs = scaled_row(xs + b * classes, classes, inv_t, buf, scale);
    zt = scaled_row(xt + b * classes, classes, inv_t, buf + classes, scale);
    top_s = row_max(zs, classes) * scale;
    top_t = row_max(zt, classes) * scale;
  }
};

template <typename acc_t>
FASTKD_INLINE void store_kd_stats(acc_t* stats, int64_t b, acc_t lse_s, acc_t lse_t, acc_t kl) {
  stats[b * 3] = lse_s;
  stats[b * 3 + 1] = lse_t;
  stats[b * 3 + 2] = kl;
}

// The per-row work of each op over rows [begin, end); the buffers hold 4 rows of C accumulators.
template <typename scalar_t, typename acc_t>
struct KdForward {
  static FASTKD_INLINE void run(const scalar_t* xs, const scalar_t* xt, int64_t classes, acc_t inv_t,
                                acc_t* stats, acc_t* buf, int64_t begin, int64_t end) {
    acc_t* e = buf + 2 * classes;
    for (int64_t b = begin; b < end; ++b) {
      const KdRow<scalar_t, acc_t> r(xs, xt, b, classes, inv_t, buf);
      const acc_t lse_s = r.top_s + std::log(sum_exp<false>(r.zs, classes, r.scale, r.top_s, e));
      const acc_t sum_t = sum_exp<true>(r.zt, classes, r.scale, r.top_t, e);  // e = p_t · sum_t
      const acc_t lse_t = r.top_t + std::log(sum_t);
      const acc_t kl = weighted_log_ratio(e, r.zt, lse_t, r.zs, lse_s, r.scale, classes) / sum_t;
      store_kd_stats(stats, b, lse_s, lse_t, kl);
    }
  }
};

// Where a row's gradient is computed: straight into the output when it has the accumulation type.
template <typename scalar_t, typename acc_t>
FASTKD_INLINE acc_t* gradient_row(scalar_t* out, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return out;
  } else {
    return scratch;
  }
}

template <typename scalar_t, typename acc_t>
FASTKD_INLINE void finish_row(const acc_t* row, int64_t n, scalar_t* out) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) store_row(row, n, out);
}

// The forward pass and the student's gradient for a unit upstream gradient, k·(p_s − p_t) with k = T/B, in one
// pass over each row's exponentials: e_s and e_t are computed once (2 exponentials per class, against 4 for
// KdForward + KdBackward) and serve both the KL terms and the gradient. The buffers hold 4 rows.
template <typename scalar_t, typename acc_t>
struct KdForwardGrad {
  static FASTKD_INLINE void run(const scalar_t* xs, const scalar_t* xt, int64_t classes, acc_t inv_t, acc_t k,
                                acc_t* stats, scalar_t* gs, acc_t* buf, int64_t begin, int64_t end) {
    acc_t* e_t = buf + 2 * classes;
    for (int64_t b = begin; b < end; ++b) {
      const KdRow<scalar_t, acc_t> r(xs, xt, b, classes, inv_t, buf);
      acc_t* e_s = gradient_row(gs + b * classes, buf + 3 * classes);
      const acc_t sum_s = sum_exp<true>(r.zs, classes, r.scale, r.top_s, e_s);  // e_s = p_s · sum_s
      const acc_t sum_t = sum_exp<true>(r.zt, classes, r.scale, r.top_t, e_t);  // e_t = p_t · sum_t
      const acc_t lse_s = r.top_s + std::log(sum_s), lse_t = r.top_t + std::log(sum_t);
      const acc_t ks = k / sum_s, kt = k / sum_t;
      pack<acc_t> total = splat(acc_t(0));
      for_packs<acc_t>(classes, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        const pack<acc_t> pt = load(e_t + c, count, acc_t(0));
        const pack<acc_t> log_ratio = (load(r.zt + c, count, acc_t(0)) * r.scale - lse_t) -
                                      (load(r.zs + c, count, acc_t(0)) * r.scale - lse_s);
        total += pt * log_ratio;
        store(e_s + c, load(e_s + c, count, acc_t(0)) * ks - pt * kt, count);
      });
      finish_row(e_s, classes, gs + b * classes);
      store_kd_stats(stats, b, lse_s, lse_t, lane_sum<acc_t>(total) / sum_t);
    }
  }
};

template <typename scalar_t, typename acc_t>
struct KdBackward {
  static FASTKD_INLINE void run(const scalar_t* xs, const scalar_t* xt, const acc_t* stats, int64_t classes,
                                acc_t inv_t, acc_t k, scalar_t* gs, scalar_t* gt, acc_t* buf, int64_t begin,
                                int64_t end) {
    const bool teacher = gt != nullptr;
    for (int64_t b = begin; b < end; ++b) {
      acc_t scale;
      const acc_t* zs = scaled_row(xs + b * classes, classes, inv_t, buf, scale);
      const acc_t* zt = scaled_row(xt + b * classes, classes, inv_t, buf + classes, scale);
      const acc_t lse_s = stats[b * 3], lse_t = stats[b * 3 + 1], kl = stats[b * 3 + 2];
      acc_t* out_s = gradient_row(gs + b * classes, buf + 2 * classes);
      acc_t* out_t = teacher ? gradient_row(gt + b * classes, buf + 3 * classes) : nullptr;
      for_packs<acc_t>(classes, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        const pack<acc_t> log_ps = load(zs + c, count, acc_t(0)) * scale - lse_s;
        const pack<acc_t> log_pt = load(zt + c, count, acc_t(0)) * scale - lse_t;
        const pack<acc_t> pt = exp_pack(log_pt);
        store(out_s + c, k * (exp_pack(log_ps) - pt), count);
        if (teacher) store(out_t + c, k * pt * (log_pt - log_ps - kl), count);
      });
      finish_row(out_s, classes, gs + b * classes);
      if (teacher) finish_row(out_t, classes, gt + b * classes);
    }
  }
};

// (log b_gt, log b_o, log r, log ĝ) of one row from z_g and O = lse over the non-target classes.
template <typename acc_t>
struct DkdRow {
  acc_t lb_gt, lb_o, log_r, log_g;
  FASTKD_INLINE DkdRow(acc_t z_g, acc_t other) {
    const acc_t all = log_add_exp(other, z_g);
    const acc_t masked = log_add_exp(other, z_g - static_cast<acc_t>(kTargetShift));
    lb_gt = z_g - all;
    lb_o = other - all;
    log_r = other - masked;
    log_g = z_g - static_cast<acc_t>(kTargetShift) - masked;
  }
};

template <typename scalar_t, typename acc_t>
struct DkdForward {
  static FASTKD_INLINE void run(const scalar_t* xs, const scalar_t* xt, const int64_t* target, int64_t classes,
                                acc_t inv_t, acc_t* stats, acc_t* buf, int64_t begin, int64_t end) {
    acc_t *zs = buf, *zt = buf + classes, *e = buf + 2 * classes;
    const acc_t masked = static_cast<acc_t>(kMasked);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g = target[b];
      load_scaled(xs + b * classes, classes, inv_t, zs);
      load_scaled(xt + b * classes, classes, inv_t, zt);
      const acc_t zg_s = zs[g], zg_t = zt[g];
      zs[g] = zt[g] = masked;
      const acc_t other_s = log_sum_exp(zs, classes, e);
      const acc_t top_t = row_max(zt, classes);
      const acc_t sum_t = sum_exp<true>(zt, classes, acc_t(1), top_t, e);  // e = q_t · sum_t, 0 at the target
      const acc_t other_t = top_t + std::log(sum_t);
      const acc_t inner = weighted_log_ratio(e, zt, other_t, zs, other_s, acc_t(1), classes) / sum_t;
      const DkdRow<acc_t> s(zg_s, other_s), t(zg_t, other_t);
      const acc_t tckd = std::exp(t.lb_gt) * (t.lb_gt - s.lb_gt) + std::exp(t.lb_o) * (t.lb_o - s.lb_o);
      const acc_t nckd = std::exp(t.log_r) * (inner + t.log_r - s.log_r) + std::exp(t.log_g) * (t.log_g - s.log_g);
      acc_t* row = stats + b * 4;
      row[0] = other_s;
      row[1] = other_t;
      row[2] = tckd;
      row[3] = nckd;
    }
  }
};

template <typename scalar_t, typename acc_t>
struct DkdBackward {
  static FASTKD_INLINE void run(const scalar_t* xs, const scalar_t* xt, const int64_t* target, const acc_t* stats,
                                int64_t classes, acc_t inv_t, acc_t k, acc_t alpha, acc_t beta, scalar_t* gs,
                                scalar_t* gt, acc_t* buf, int64_t begin, int64_t end) {
    acc_t *zs = buf, *zt = buf + classes;
    const acc_t masked = static_cast<acc_t>(kMasked);
    const bool teacher = gt != nullptr;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g = target[b];
      load_scaled(xs + b * classes, classes, inv_t, zs);
      load_scaled(xt + b * classes, classes, inv_t, zt);
      const acc_t other_s = stats[b * 4], other_t = stats[b * 4 + 1], tckd = stats[b * 4 + 2],
                  nckd = stats[b * 4 + 3];
      const DkdRow<acc_t> s(zs[g], other_s), t(zt[g], other_t);
      zs[g] = zt[g] = masked;
      const acc_t b_o_t = std::exp(t.lb_o), b_gt_t = std::exp(t.lb_gt), r_t = std::exp(t.log_r);
      const acc_t g_t = std::exp(t.log_g);
      // non-target columns: k·(q_s·coef_s − coef_t·q_t) for the student,
      // k·q_t·(tc_t + coef_t·(log q_t − log q_s + shift_t)) for the teacher
      const acc_t coef_s = alpha * (std::exp(s.lb_o) - b_o_t) + beta * std::exp(s.log_r), coef_t = beta * r_t;
      const acc_t tc_t = alpha * b_o_t * ((t.lb_o - s.lb_o) - tckd);
      const acc_t shift_t = t.log_r - s.log_r - nckd;
      acc_t* out_s = gradient_row(gs + b * classes, buf + 2 * classes);
      acc_t* out_t = teacher ? gradient_row(gt + b * classes, buf + 3 * classes) : nullptr;
      for_packs<acc_t>(classes, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
        const pack<acc_t> log_qs = load(zs + c, count, acc_t(0)) - other_s;
        const pack<acc_t> log_qt = load(zt + c, count, acc_t(0)) - other_t;
        const pack<acc_t> qt = exp_pack(log_qt);
        store(out_s + c, k * (exp_pack(log_qs) * coef_s - coef_t * qt), count);
        if (teacher) store(out_t + c, k * qt * (tc_t + coef_t * (log_qt - log_qs + shift_t)), count);
      });
      out_s[g] = k * (alpha * (std::exp(s.lb_gt) - b_gt_t) + beta * (std::exp(s.log_g) - g_t));
      finish_row(out_s, classes, gs + b * classes);
      if (teacher) {
        out_t[g] = k * (alpha * b_gt_t * ((t.lb_gt - s.lb_gt) - tckd) + beta * g_t * (t.log_g - s.log_g - nckd));
        finish_row(out_t, classes, gt + b * classes);
      }
    }
  }
};

template <typename Kernel, typename... Args>
void run_rows(int64_t rows, int64_t classes, int64_t buffers, Args... args) {
  using acc_t = typename Kernel::acc_type;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(classes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(static_cast<size_t>(buffers * classes));
    vec::run_vectorized<Kernel>(args..., buf.data(), begin, end);
  });
}

template <template <typename, typename> class K, typename scalar_t, typename acc_t>
struct Bind : K<scalar_t, acc_t> {
  using acc_type = acc_t;
};

void check_logits(const char* op, const at::Tensor& logits_s, const at::Tensor& logits_t) {
  TORCH_CHECK(logits_s.device().is_cpu() && logits_t.device().is_cpu(), op, ": the CPU kernel needs CPU tensors");
  TORCH_CHECK(logits_s.dim() == 2 && logits_s.sizes() == logits_t.sizes(), op,
              ": logits_s and logits_t must be [B, C] of one shape, got ", logits_s.sizes(), " and ",
              logits_t.sizes());
  TORCH_CHECK(logits_s.scalar_type() == logits_t.scalar_type(), op, ": logits_s and logits_t must share a dtype");
  TORCH_CHECK(logits_s.size(0) > 0 && logits_s.size(1) > 0, op, ": the logits are empty");
}

void check_target(const char* op, const at::Tensor& target, int64_t rows, int64_t classes) {
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == rows,
              op, ": target must be an int64 CPU tensor of shape [", rows, "]");
  TORCH_CHECK(classes >= 2, op, ": DKD needs at least 2 classes, got ", classes);
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK(t[b] >= 0 && t[b] < classes, op, ": target holds index ", t[b], ", outside [0, ", classes, ")");
}

at::ScalarType accumulation(const at::Tensor& x) { return at::toOpMathType(x.scalar_type()); }

// T²/B Σ_b Σ_j weight_j · stats[b, first + j], in the accumulation type.
template <typename acc_t>
at::Tensor loss_from_stats(const at::Tensor& stats, int64_t first, std::vector<double> weights, double scale) {
  const acc_t* s = stats.data_ptr<acc_t>();
  const int64_t rows = stats.size(0), width = stats.size(1);
  double total = 0;
  for (int64_t b = 0; b < rows; ++b)
    for (size_t j = 0; j < weights.size(); ++j) total += weights[j] * static_cast<double>(s[b * width + first + j]);
  return at::scalar_tensor(total * scale, stats.options());
}

template <typename acc_t>
acc_t upstream(const at::Tensor& grad) {
  return static_cast<acc_t>(grad.item<double>());
}

}  // namespace

namespace {

// KD's forward pass: (loss, stats), with the student's gradient for a unit upstream gradient as a third
// tensor when ``with_grad`` (undefined otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_forward(const char* op, const at::Tensor& logits_s,
                                                          const at::Tensor& logits_t, double temperature,
                                                          bool with_grad) {
  check_logits(op, logits_s, logits_t);
  const at::Tensor xs = logits_s.contiguous(), xt = logits_t.contiguous();
  const int64_t rows = xs.size(0), classes = xs.size(1);
  at::Tensor stats = at::empty({rows, 3}, xs.options().dtype(accumulation(xs)));
  at::Tensor grad_s = with_grad ? at::empty_like(xs) : at::Tensor();
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "kd_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    if (with_grad) {
      run_rows<Bind<KdForwardGrad, scalar_t, acc_t>>(
          rows, classes, 4, xs.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), classes, inv_t,
          static_cast<acc_t>(temperature / rows), stats.data_ptr<acc_t>(), grad_s.data_ptr<scalar_t>());
    } else {
      run_rows<Bind<KdForward, scalar_t, acc_t>>(rows, classes, 3, xs.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(),
                                                 classes, inv_t, stats.data_ptr<acc_t>());
    }
    loss = loss_from_stats<acc_t>(stats, 2, {1.0}, temperature * temperature / rows);
  });
  return {loss, stats, grad_s};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_loss(const at::Tensor& logits_s, const at::Tensor& logits_t, double temperature) {
  auto [loss, stats, unused] = kd_forward("kd_loss", logits_s, logits_t, temperature, false);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_with_grad(const at::Tensor& logits_s, const at::Tensor& logits_t,
                                                               double temperature) {
  return kd_forward("kd_loss_with_grad", logits_s, logits_t, temperature, true);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward(const at::Tensor& grad, const at::Tensor& logits_s,
                                                    const at::Tensor& logits_t, const at::Tensor& stats,
                                                    double temperature, bool teacher_grad) {
  check_logits("kd_loss_backward", logits_s, logits_t);
  const at::Tensor xs = logits_s.contiguous(), xt = logits_t.contiguous();
  const int64_t rows = xs.size(0), classes = xs.size(1);
  const at::Tensor st = stats.to(accumulation(xs)).contiguous();
  TORCH_CHECK(st.dim() == 2 && st.size(0) == rows && st.size(1) == 3, "kd_loss_backward: stats must be [B, 3]");
  at::Tensor grad_s = at::empty_like(xs), grad_t = teacher_grad ? at::empty_like(xt) : xt.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "kd_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t k = upstream<acc_t>(grad) * static_cast<acc_t>(temperature / rows);
    run_rows<Bind<KdBackward, scalar_t, acc_t>>(
        rows, classes, 4, xs.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), st.data_ptr<acc_t>(), classes,
        static_cast<acc_t>(1.0 / temperature), k, grad_s.data_ptr<scalar_t>(),
        teacher_grad ? grad_t.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
  });
  return {grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor> dkd_loss(const at::Tensor& logits_s, const at::Tensor& logits_t,
                                            const at::Tensor& target, double alpha, double beta, double temperature) {
  check_logits("dkd_loss", logits_s, logits_t);
  const at::Tensor xs = logits_s.contiguous(), xt = logits_t.contiguous(), y = target.contiguous();
  const int64_t rows = xs.size(0), classes = xs.size(1);
  check_target("dkd_loss", y, rows, classes);
  at::Tensor stats = at::empty({rows, 4}, xs.options().dtype(accumulation(xs)));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "dkd_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run_rows<Bind<DkdForward, scalar_t, acc_t>>(rows, classes, 3, xs.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(),
                                                y.data_ptr<int64_t>(), classes,
                                                static_cast<acc_t>(1.0 / temperature), stats.data_ptr<acc_t>());
    loss = loss_from_stats<acc_t>(stats, 2, {alpha, beta}, temperature * temperature / rows);
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> dkd_loss_backward(const at::Tensor& grad, const at::Tensor& logits_s,
                                                     const at::Tensor& logits_t, const at::Tensor& target,
                                                     const at::Tensor& stats, double alpha, double beta,
                                                     double temperature, bool teacher_grad) {
  check_logits("dkd_loss_backward", logits_s, logits_t);
  const at::Tensor xs = logits_s.contiguous(), xt = logits_t.contiguous(), y = target.contiguous();
  const int64_t rows = xs.size(0), classes = xs.size(1);
  check_target("dkd_loss_backward", y, rows, classes);
  const at::Tensor st = stats.to(accumulation(xs)).contiguous();
  TORCH_CHECK(st.dim() == 2 && st.size(0) == rows && st.size(1) == 4, "dkd_loss_backward: stats must be [B, 4]");
  at::Tensor grad_s = at::empty_like(xs), grad_t = teacher_grad ? at::empty_like(xt) : xt.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "dkd_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t k = upstream<acc_t>(grad) * static_cast<acc_t>(temperature / rows);
    run_rows<Bind<DkdBackward, scalar_t, acc_t>>(
        rows, classes, 4, xs.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), y.data_ptr<int64_t>(),
        st.data_ptr<acc_t>(), classes, static_cast<acc_t>(1.0 / temperature), k, static_cast<acc_t>(alpha),
        static_cast<acc_t>(beta), grad_s.data_ptr<scalar_t>(),
        teacher_grad ? grad_t.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
  });
  return {grad_s, grad_t};
}

}  // namespace fastkd::cpu

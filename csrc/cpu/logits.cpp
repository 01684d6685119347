// CPU kernels of the logit losses KD and DKD (fastkd::kd_loss, fastkd::dkd_loss and their backward ops).
//
// The formulas and the torch contract are in fastkd/ops/logits.py; the comment above its contract section
// derives them. In short, a row's KL(p_t ‖ p_s) is summed as Σ_c p_t ψ(w_c) with ψ(w) = e^{−w} − 1 + w ≥ 0 and
// the log-ratios w_c = log p_t,c − log p_s,c formed from the logits' differences (LogRatio), so that no
// first-order parts cancel (the published Σ p_t w is mostly rounding at T ≥ 1e3 or a student within 1e-3 of its
// teacher), and ρ = ℓ_t − ℓ_s is corrected by one Newton step. Every exponential has its row's largest logit
// subtracted before the division by T. A wide row (KL ≥ 1/4: training at T ≈ 4) takes the plain sums, whose
// rounding is small next to it (kl_pass, BackwardRow), and only the others the series.
//
// Rows are spread over threads with at::parallel_for. fp32 / fp64 logits are read in place (DKD's target column
// is skipped, not masked in a copy); fp16 / bf16 rows are converted into fp32 buffers once. A forward row is three
// passes that stay in cache: the two maxima, the exponentials of both sides (2 per class, the teacher's stored),
// and the KL terms (a fourth pass in a narrow row); backward is one pass (2 exponentials per class). Nothing of
// size B×C is allocated besides the gradients. DKD's per-row two-outcome divergences are computed in double.
//
// The inner loops run on the packs of vec.h (a branch-free polynomial exponential), compiled for AVX2 + FMA
// and for the baseline ISA and picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace fastkd::cpu {
namespace {

using namespace vec;

constexpr double kTargetShift = 1000.0;  // mdistiller's −1000 on the target logit (NCKD)
constexpr double kPsiRadius = 1.0;       // |w| below which ψ comes from its Taylor series
// Elements a thread should get at least before the rows are split.
constexpr int64_t kGrainElements = 16384;

// ---- ψ(w) = e^{−w} − 1 + w and the per-class quantities of a KL --------------------------------------------

// Σ_{n < kTerms} u^n / (n + kFirst)! by Horner's rule: the Taylor series of ψ(w)/w² in u = −w (kFirst 2) and of
// expm1(x)/x in u = x (kFirst 1). V is a pack of T or a T.
template <typename T, int kFirst, int kTerms>
struct TaylorSeries {
  static constexpr std::array<T, kTerms> coefficients() {
    std::array<T, kTerms> c{};
    double inverse = 1;
    for (int k = 2; k <= kFirst; ++k) inverse /= k;
    for (int n = 0; n < kTerms; ++n) {
      c[n] = static_cast<T>(inverse);
      inverse /= n + kFirst + 1;
    }
    return c;
  }
  static constexpr std::array<T, kTerms> kCoefficients = coefficients();

  template <typename V>
  static FASTKD_INLINE V sum(V u) {
    V total = u * T(0) + kCoefficients[kTerms - 1];
#pragma GCC unroll 17
    for (int n = kTerms - 2; n >= 0; --n) total = total * u + kCoefficients[n];
    return total;
  }
};

// ψ(w) for |w| ≤ kPsiRadius = 1: w² Σ (−w)^n / (n + 2)!, the terms up to the first below the type's rounding
// relative to ψ (fp32: 10, 1/(12!·ψ(1)) = 6e-9; fp64: 17, 2e-17).
template <typename T>
using PsiSeries = TaylorSeries<T, 2, std::is_same_v<T, float> ? 10 : 17>;

template <typename T, typename V>
FASTKD_INLINE V psi_near_zero(V w) {
  return w * w * PsiSeries<T>::sum(-w);
}

// ψ(w) for any w (a row's scalar).
FASTKD_INLINE double psi(double w) {
  return std::abs(w) < kPsiRadius ? psi_near_zero<double>(w) : std::expm1(-w) + w;
}

FASTKD_INLINE pack<float> magnitude(pack<float> v) { return v < 0.0f ? -v : v; }
FASTKD_INLINE pack<double> magnitude(pack<double> v) { return v < 0.0 ? -v : v; }
FASTKD_INLINE double magnitude(double v) { return std::abs(v); }

// One class of KL(p_t ‖ p_s) from p_t, p_s and w = log p_t − log p_s: term = p_t ψ(w) = p_t w + p_s − p_t ≥ 0
// (its sum over the classes is the KL) and diff = p_s − p_t = p_t (e^{−w} − 1), both from ψ's series where
// |w| < 1, so neither cancels when p_s ≈ p_t. V is a pack of T or a T.
template <typename V>
struct KlClass {
  V term, diff;
};

template <typename T, typename V>
FASTKD_INLINE KlClass<V> kl_class(V p_t, V p_s, V w) {
  const auto near = magnitude(w) < T(kPsiRadius);
  const V w_near = near ? w : w * T(0);
  const V series = psi_near_zero<T>(w_near);
  return {near ? p_t * series : p_s - p_t + p_t * w, near ? p_t * (series - w_near) : p_s - p_t};
}

// p_s − p_t alone, as a gradient needs it: p_t·expm1(−w) by the shorter series of expm1(x)/x where |w| < 1/8 (fp32:
// 5 terms, the first left out 8^−5/6! = 4e-8 relative; fp64: 10), the difference of the two elsewhere (whose
// rounding, ε·(p_s + p_t), is then at most 17ε relative to it).
constexpr double kDiffRadius = 0.125;

template <typename T>
using Expm1Series = TaylorSeries<T, 1, std::is_same_v<T, float> ? 5 : 10>;

template <typename T>
FASTKD_INLINE pack<T> prob_difference(pack<T> p_t, pack<T> p_s, pack<T> w) {
  const auto near = magnitude(w) < T(kDiffRadius);
  const pack<T> u = near ? -w : w * T(0);
  return near ? p_t * u * Expm1Series<T>::sum(u) : p_s - p_t;
}

// ---- one row's softmax and KL -------------------------------------------------------------------------------

// body(std::true_type) or body(std::false_type) as ``flag`` says: a row's loop compiled for both values of a flag
// that holds for the whole row.
template <typename Body>
FASTKD_INLINE void for_flag(bool flag, Body&& body) {
  if (flag)
    body(std::true_type{});
  else
    body(std::false_type{});
}

// body(c, count) over the packs of a row of n, without column ``skip`` (−1: none): the columns before it, then
// those after it.
template <typename T, typename Body>
FASTKD_INLINE void for_packs_except(int64_t n, int64_t skip, Body&& body) {
  if (skip < 0) {
    for_packs<T>(n, body);
    return;
  }
  for_packs<T>(skip, body);
  for_packs<T>(n - skip - 1,
               [&](int64_t c, int64_t count) __attribute__((always_inline)) { body(skip + 1 + c, count); });
}

// max x[c] over [0, n): two packs a step into two running maxima (a compare and a blend each: one chain would
// wait on the last), then the rest one pack at a time.
template <typename acc_t>
FASTKD_INLINE pack<acc_t> range_max(const acc_t* x, int64_t n, pack<acc_t> top) {
  constexpr int64_t kStep = 2 * kWidth<acc_t>;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  pack<acc_t> other = top;
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    const pack<acc_t> u = load(x + c, kWidth<acc_t>, lowest), v = load(x + c + kWidth<acc_t>, kWidth<acc_t>, lowest);
    top = top < u ? u : top;
    other = other < v ? v : other;
  }
  top = top < other ? other : top;
  for_packs<acc_t>(n - c, [&](int64_t d, int64_t count) __attribute__((always_inline)) {
    const pack<acc_t> v = load(x + c + d, count, lowest);
    top = top < v ? v : top;
  });
  return top;
}

template <typename acc_t>
FASTKD_INLINE acc_t row_max(const acc_t* x, int64_t n, int64_t skip) {
  pack<acc_t> top = splat(-std::numeric_limits<acc_t>::infinity());
  if (skip < 0) {
    top = range_max(x, n, top);
  } else {
    top = range_max(x + skip + 1, n - skip - 1, range_max(x, skip, top));
  }
  acc_t best = top[0];
  for (int j = 1; j < kWidth<acc_t>; ++j) best = best < top[j] ? top[j] : best;
  return best;
}

// One side of a row without column ``skip`` (−1: none): M = max x (logit units) and Σ_c exp((x_c − M)/T), the
// exponentials stored in e (0 at ``skip``) unless it is null (then kl_pass computes them again where it needs them).
template <typename acc_t>
struct Softmax {
  acc_t top, sum;
};

template <typename acc_t>
FASTKD_INLINE pack<acc_t> shifted_exp(const acc_t* x, int64_t c, int64_t count, acc_t top, acc_t inv_t) {
  return exp_pack((load(x + c, count, -std::numeric_limits<acc_t>::infinity()) - top) * inv_t);
}

template <typename acc_t>
FASTKD_INLINE Softmax<acc_t> softmax_row(const acc_t* x, int64_t n, int64_t skip, acc_t inv_t, acc_t* e) {
  const acc_t top = row_max(x, n, skip);
  pack<acc_t> total = splat(acc_t(0));
  for_flag(e != nullptr, [&](auto keep) __attribute__((always_inline)) {
    for_packs_except<acc_t>(n, skip, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
      const pack<acc_t> v = shifted_exp(x, c, count, top, inv_t);
      if constexpr (keep) store(e + c, v, count);
      total += v;
    });
  });
  if (e != nullptr && skip >= 0) e[skip] = 0;
  return {top, lane_sum<acc_t>(total)};
}

// How a row's log-ratios w = log p_t − log p_s are formed (fastkd.ops.logits.log_ratio): (x_t − x_s)/T − Δ with
// Δ = (M_t − M_s)/T + ρ while the maxima are within kFarMaxima·T of each other, else ((x_t − M_t) − (x_s − M_s))/T
// − ρ (each logit against its own row's maximum); ρ = ℓ_t − ℓ_s. V is a pack of T or a T.
constexpr double kFarMaxima = 8.0;

template <typename T>
struct LogRatio {
  bool far;
  T top_t, top_s, offset, inv_t;
  LogRatio(double top_t_, double top_s_, double rho, T inv_t_)
      : far(std::abs((top_t_ - top_s_) * inv_t_) > kFarMaxima),
        top_t(static_cast<T>(top_t_)),
        top_s(static_cast<T>(top_s_)),
        offset(static_cast<T>(far ? rho : (top_t_ - top_s_) * inv_t_ + rho)),
        inv_t(inv_t_) {}
  template <bool kFar, typename V>
  FASTKD_INLINE V of(V x_s, V x_t) const {
    if constexpr (kFar) return ((x_t - top_t) - (x_s - top_s)) * inv_t - offset;
    return (x_t - x_s) * inv_t - offset;
  }
  template <typename V>
  FASTKD_INLINE V operator()(V x_s, V x_t) const {
    return far ? of<true>(x_s, x_t) : of<false>(x_s, x_t);
  }
};

// A row's KL(p_t ‖ p_s) and the numbers of the contract: ρ = ℓ_t − ℓ_s (after the Newton step where it ran) and
// y, its correction (0 where it did not run).
struct RowKl {
  double kl, rho, y, ell_t;
};

// A row is wide when its KL is at least this: the plain sums serve it (kl_pass, BackwardRow).
constexpr double kWideKl = 0.25;

// The KL of a row given the teacher's exponentials (and the student's, es, unless it is null), with w₀ from
// ρ₀ = log(Σe_t / Σe_s) (the log of the ratio: its rounding is relative to ρ₀, not to ℓ). First the plain sum
// Σ p_t w₀, whose rounding, of order ε·(Σ p_t |w₀| + 1), is kept in a wide row, KL ≥ kWideKl: there
// Σ p_t |w| ≤ 7.4·KL (ψ(w) ≥ 0.37|w| for |w| ≥ 1, ψ(w) ≥ 0.18 w² below), so the rounding is below 16ε·KL
// (training at T ≈ 4: nearly every row). A narrow row (a large T, a student close to its teacher) takes a second
// pass, Σ p_t ψ(w₀) by ψ's series, and the Newton step: h = Σ (p_s − p_t) / Σ p_t, y = log1p(h),
// KL = Σ p_t ψ(w₀) − Σp_t·ψ(−y), ρ = ρ₀ − y. With kDiff, diff[c] = scale·(p_s − p_t) for w₀ (see KdForward for the
// correction by y).
template <bool kDiff, typename acc_t>
FASTKD_INLINE RowKl kl_pass(const acc_t* xs, const acc_t* xt, const acc_t* es, const acc_t* et, int64_t n,
                            acc_t inv_t, Softmax<acc_t> s, Softmax<acc_t> t, acc_t scale, acc_t* diff) {
  const acc_t rho0 = std::log1p((t.sum - s.sum) / s.sum), ell_t = std::log(t.sum);
  const LogRatio<acc_t> ratio(t.top, s.top, rho0, inv_t);
  const acc_t inv_s = acc_t(1) / s.sum, inv_sum_t = acc_t(1) / t.sum;
  double plain = 0;
  for_flag(ratio.far, [&](auto far) __attribute__((always_inline)) {
    const acc_t scale_s = inv_s * scale, scale_t = inv_sum_t * scale;
    pack<acc_t> total = splat(acc_t(0));
    for_packs<acc_t>(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
      const pack<acc_t> e_t = load(et + c, count, acc_t(0));
      total += e_t * ratio.template of<far>(load(xs + c, count, acc_t(0)), load(xt + c, count, acc_t(0)));
      if constexpr (kDiff) store(diff + c, load(es + c, count, acc_t(0)) * scale_s - e_t * scale_t, count);
    });
    plain = lane_sum<acc_t>(total) * inv_sum_t;
  });
  if (plain >= kWideKl) return {plain, rho0, 0.0, ell_t};
  pack<acc_t> total = splat(acc_t(0)), change = total, mass = total;
  for_packs<acc_t>(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
    // (with kDiff the plain pass has overwritten es with the differences)
    const pack<acc_t> e_s =
        es != nullptr && !kDiff ? load(es + c, count, acc_t(0)) : shifted_exp(xs, c, count, s.top, inv_t);
    const pack<acc_t> p_t = load(et + c, count, acc_t(0)) * inv_sum_t, p_s = e_s * inv_s;
    const KlClass<pack<acc_t>> k =
        kl_class<acc_t>(p_t, p_s, ratio(load(xs + c, count, acc_t(0)), load(xt + c, count, acc_t(0))));
    total += k.term;
    change += k.diff;
    mass += p_t;
    if constexpr (kDiff) store(diff + c, k.diff * scale, count);
  });
  const double p = lane_sum<acc_t>(mass);
  const double y = std::log1p(lane_sum<acc_t>(change) / p);
  // ≥ 0 exactly (a minimum over ρ of a sum of non-negative terms): a negative difference is rounding
  const double kl = std::max(0.0, lane_sum<acc_t>(total) - p * psi(-y));
  return {kl, rho0 - y, y, ell_t};
}

// A row's backward frame from its statistics (M_t, ℓ_t, ρ, M_s) and KL: log p_t = (x_t − M_t)/T − ℓ_t, log p_s =
// (x_s − M_s)/T − (ℓ_t − ρ), w as LogRatio (as the forward pass formed it, so that w − KL is exactly 0 at the class of
// a one-hot teacher). for_classes(n, body) runs body(c, count, p_t, w, p_s − p_t) over the packs of a row: in a wide
// row (KL ≥ kWideKl) p_s − p_t plainly, as log_softmax's gradient has it (its rounding, of order ε·p, is small next
// to such a row's gradient); in a narrow one by prob_difference, without cancellation.
template <typename acc_t>
struct BackwardRow {
  acc_t top_t, ell_t, top_s, ell_s, inv_t;
  LogRatio<acc_t> ratio;
  bool wide;
  BackwardRow(double top_t_, double ell_t_, double rho, double top_s_, double kl, acc_t inv_t_)
      : top_t(static_cast<acc_t>(top_t_)),
        ell_t(static_cast<acc_t>(ell_t_)),
        top_s(static_cast<acc_t>(top_s_)),
        ell_s(static_cast<acc_t>(ell_t_ - rho)),
        inv_t(inv_t_),
        ratio(top_t_, top_s_, rho, inv_t_),
        wide(kl >= kWideKl) {}

  template <typename Body>
  FASTKD_INLINE void for_classes(const acc_t* xs, const acc_t* xt, int64_t n, Body&& body) const {
    for_flag(ratio.far, [&](auto far) __attribute__((always_inline)) {
      for_flag(wide, [&](auto plain) __attribute__((always_inline)) {
        for_packs<acc_t>(n, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
          const pack<acc_t> x_s = load(xs + c, count, acc_t(0)), x_t = load(xt + c, count, acc_t(0));
          const pack<acc_t> p_t = exp_pack((x_t - top_t) * inv_t - ell_t), w = ratio.template of<far>(x_s, x_t);
          const pack<acc_t> p_s = exp_pack((x_s - top_s) * inv_t - ell_s);
          if constexpr (plain) {
            body(c, count, p_t, w, p_s - p_t);
          } else {
            body(c, count, p_t, w, prob_difference<acc_t>(p_t, p_s, w));
          }
        });
      });
    });
  }
};

// The row of x that the loops read: x itself when it has the accumulation type, else x converted into ``buffer``.
template <typename scalar_t, typename acc_t>
FASTKD_INLINE const acc_t* acc_row(const scalar_t* x, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    for (int64_t c = 0; c < n; ++c) buffer[c] = static_cast<acc_t>(x[c]);
    return buffer;
  }
}

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
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<scalar_t>(row[c]);
  }
}

template <typename acc_t>
FASTKD_INLINE void store_stats(acc_t* row, std::initializer_list<double> values) {
  for (double v : values) *row++ = static_cast<acc_t>(v);
}

// ---- KD -------------------------------------------------------------------------------------------------------

// KD's forward pass; with gs, also the student's gradient for a unit upstream gradient, k·(p_s − p_t), k = T/B,
// from the same exponentials (2 per class, against 4 for a forward and a backward pass): the KL pass leaves
// k·(p_s − p_t) for w₀, and where the Newton step ran, since w = w₀ + y, p_s − p_t = e^{−y}·(that) +
// expm1(−y)·p_t: one more pass.
// Buffers: 4 rows (the converted logits, e_s unless the gradient row holds it, e_t).
// stats[b] = (M_t, ℓ_t, KL_b, ρ, M_s).
template <typename scalar_t, typename acc_t>
struct KdForward {
  static FASTKD_INLINE void run(const scalar_t* x_s, const scalar_t* x_t, int64_t classes, acc_t inv_t, acc_t k,
                                acc_t* stats, scalar_t* gs, acc_t* buf, int64_t begin, int64_t end) {
    acc_t* e_t = buf + 2 * classes;
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* xs = acc_row(x_s + b * classes, classes, buf);
      const acc_t* xt = acc_row(x_t + b * classes, classes, buf + classes);
      acc_t* e_s = gs != nullptr ? gradient_row(gs + b * classes, buf + 3 * classes) : nullptr;
      const Softmax<acc_t> s = softmax_row(xs, classes, -1, inv_t, e_s), t = softmax_row(xt, classes, -1, inv_t, e_t);
      RowKl r;
      if (gs == nullptr) {
        r = kl_pass<false>(xs, xt, e_s, e_t, classes, inv_t, s, t, k, static_cast<acc_t*>(nullptr));
      } else {
        r = kl_pass<true>(xs, xt, e_s, e_t, classes, inv_t, s, t, k, e_s);  // e_s is read before it is overwritten
        if (r.y != 0) {
          const acc_t scale = static_cast<acc_t>(std::exp(-r.y));
          const acc_t shift = static_cast<acc_t>(k * std::expm1(-r.y) / t.sum);
          for_packs<acc_t>(classes, [&](int64_t c, int64_t count) __attribute__((always_inline)) {
            store(e_s + c, load(e_s + c, count, acc_t(0)) * scale + load(e_t + c, count, acc_t(0)) * shift, count);
          });
        }
        finish_row(e_s, classes, gs + b * classes);
      }
      store_stats(stats + b * 5, {static_cast<double>(t.top), r.ell_t, r.kl, r.rho, static_cast<double>(s.top)});
    }
  }
};

template <typename scalar_t, typename acc_t>
struct KdBackward {
  static FASTKD_INLINE void run(const scalar_t* x_s, const scalar_t* x_t, const acc_t* stats, int64_t classes,
                                acc_t inv_t, acc_t k, scalar_t* gs, scalar_t* gt, acc_t* buf, int64_t begin,
                                int64_t end) {
    const bool teacher = gt != nullptr;
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* xs = acc_row(x_s + b * classes, classes, buf);
      const acc_t* xt = acc_row(x_t + b * classes, classes, buf + classes);
      const acc_t* st = stats + b * 5;
      const BackwardRow<acc_t> row(st[0], st[1], st[3], st[4], st[2], inv_t);
      const acc_t kl = st[2];
      acc_t* out_s = gradient_row(gs + b * classes, buf + 2 * classes);
      acc_t* out_t = teacher ? gradient_row(gt + b * classes, buf + 3 * classes) : nullptr;
      row.for_classes(xs, xt, classes, [&](int64_t c, int64_t count, pack<acc_t> p_t, pack<acc_t> w,
                                           pack<acc_t> diff) __attribute__((always_inline)) {
        store(out_s + c, k * diff, count);
        if (teacher) store(out_t + c, k * p_t * (w - kl), count);
      });
      finish_row(out_s, classes, gs + b * classes);
      if (teacher) finish_row(out_t, classes, gt + b * classes);
    }
  }
};

// ---- DKD ------------------------------------------------------------------------------------------------------

// Two-outcome distributions (target, rest) with the teacher's log-odds λ_t and the student's λ_s = λ_t − δ:
// b = (σ(λ), σ(−λ)) of each and the log-ratios w = log b_t − log b_s, that is w_gt = sp(−λ_s) − sp(−λ_t) and
// w_o = sp(λ_s) − sp(λ_t), sp(x) = log(1 + e^x), without cancellation (fastkd.ops.logits.softplus_difference): for
// |δ| < 1 w_gt = log1p(σ(−λ_t)·expm1(δ)) and w_o = log1p(σ(λ_t)·expm1(−δ)); elsewhere sp(x) = max(x, 0) +
// log1p(e^{−|x|}) with the two parts differenced apart. Five exponentials or logarithms in all, shared by both.
struct Binary {
  double b_t[2], b_s[2], w[2];
  Binary(double lam_t, double gap) {
    const double lam_s = lam_t - gap;
    const double e_t = std::exp(-std::abs(lam_t)), e_s = std::exp(-std::abs(lam_s));
    sigmoids(lam_t, e_t, b_t);
    sigmoids(lam_s, e_s, b_s);
    if (std::abs(gap) < 1) {
      const double m = std::expm1(gap);  // expm1(−δ) = −m / (1 + m)
      w[0] = std::log1p(b_t[1] * m);
      w[1] = std::log1p(-b_t[0] * m / (1 + m));
    } else {
      const double tails = std::log1p(e_s) - std::log1p(e_t);
      w[0] = (std::max(-lam_s, 0.0) - std::max(-lam_t, 0.0)) + tails;
      w[1] = (std::max(lam_s, 0.0) - std::max(lam_t, 0.0)) + tails;
    }
  }
  // (σ(λ), σ(−λ)) from e = e^{−|λ|}
  static void sigmoids(double lam, double e, double* out) {
    const double big = 1 / (1 + e), small = e / (1 + e);
    out[0] = lam >= 0 ? big : small;
    out[1] = lam >= 0 ? small : big;
  }
  double kl() const {
    return kl_class<double>(b_t[0], b_s[0], w[0]).term + kl_class<double>(b_t[1], b_s[1], w[1]).term;
  }
  double target_diff() const { return kl_class<double>(b_t[0], b_s[0], w[0]).diff; }  // b_s,gt − b_t,gt
};

// A DKD row's target-side numbers: TCKD's (target, rest) and NCKD's (target − 1000, rest), from λ_t =
// (x_t,g − M_t)/T − ℓ_t and δ = λ_t − λ_s, the target column's log-ratio (M, ℓ, ρ of the non-target classes).
struct DkdTarget {
  Binary tc, nc;
  DkdTarget(double lam_t, double gap) : tc(lam_t, gap), nc(lam_t - kTargetShift, gap) {}
};

DkdTarget dkd_target(double xg_s, double xg_t, double top_t, double ell_t, double rho, double top_s, double inv_t) {
  return DkdTarget((xg_t - top_t) * inv_t - ell_t, LogRatio<double>(top_t, top_s, rho, inv_t)(xg_s, xg_t));
}

// stats[b] = (M_t, ℓ_t, TCKD_b, NCKD_b, ρ, M_s, K_b), M, ℓ, ρ over the non-target classes.
template <typename scalar_t, typename acc_t>
struct DkdForward {
  static FASTKD_INLINE void run(const scalar_t* x_s, const scalar_t* x_t, const int64_t* target, int64_t classes,
                                acc_t inv_t, acc_t* stats, acc_t* buf, int64_t begin, int64_t end) {
    acc_t *e_s = buf + 2 * classes, *e_t = buf + 3 * classes;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g = target[b];
      const acc_t* xs = acc_row(x_s + b * classes, classes, buf);
      const acc_t* xt = acc_row(x_t + b * classes, classes, buf + classes);
      const Softmax<acc_t> s = softmax_row(xs, classes, g, inv_t, e_s), t = softmax_row(xt, classes, g, inv_t, e_t);
      // the target column: p_t = p_s = 0 against a finite log-ratio
      const RowKl r = kl_pass<false>(xs, xt, e_s, e_t, classes, inv_t, s, t, acc_t(1), static_cast<acc_t*>(nullptr));
      const DkdTarget d = dkd_target(xs[g], xt[g], t.top, r.ell_t, r.rho, s.top, inv_t);
      const double nckd = d.nc.b_t[1] * r.kl + d.nc.kl();
      store_stats(stats + b * 7,
                  {static_cast<double>(t.top), r.ell_t, d.tc.kl(), nckd, r.rho, static_cast<double>(s.top), r.kl});
    }
  }
};

template <typename scalar_t, typename acc_t>
struct DkdBackward {
  static FASTKD_INLINE void run(const scalar_t* x_s, const scalar_t* x_t, const int64_t* target, const acc_t* stats,
                                int64_t classes, acc_t inv_t, acc_t k, double alpha, double beta, scalar_t* gs,
                                scalar_t* gt, acc_t* buf, int64_t begin, int64_t end) {
    const bool teacher = gt != nullptr;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g = target[b];
      const acc_t* st = stats + b * 7;
      const double inner = st[6];
      const acc_t* xs = acc_row(x_s + b * classes, classes, buf);
      const acc_t* xt = acc_row(x_t + b * classes, classes, buf + classes);
      const DkdTarget d = dkd_target(xs[g], xt[g], st[0], st[1], st[4], st[5], inv_t);
      const BackwardRow<acc_t> frame(st[0], st[1], st[4], st[5], inner, inv_t);
      const double r_t = d.nc.b_t[1];
      // ∂/∂x_s,g = k·A and ∂/∂x_t,g = k·G; the other classes: k·(β r_t (q_s − q_t) − q_s A), k·q_t (β r_t (w − K) − G)
      const double at_target = alpha * d.tc.target_diff() + beta * d.nc.target_diff();
      const double lam_grad = alpha * d.tc.b_t[0] * d.tc.b_t[1] * (d.tc.w[0] - d.tc.w[1]) +
                              beta * d.nc.b_t[0] * r_t * (d.nc.w[0] - d.nc.w[1] - inner);
      // per class: k·(β r_t − A)·(q_s − q_t) − k·A·q_t and q_t·(k β r_t·(w − K) − k G) (w − K first: both can be
      // large where the two disagree)
      const acc_t diff_coef = static_cast<acc_t>(k * (beta * r_t - at_target));
      const acc_t q_coef = static_cast<acc_t>(k * at_target);
      const acc_t w_coef = static_cast<acc_t>(k * beta * r_t), kl = static_cast<acc_t>(inner);
      const acc_t t_shift = static_cast<acc_t>(k * lam_grad);
      acc_t* out_s = gradient_row(gs + b * classes, buf + 2 * classes);
      acc_t* out_t = teacher ? gradient_row(gt + b * classes, buf + 3 * classes) : nullptr;
      // the target column's values are overwritten below
      frame.for_classes(xs, xt, classes, [&](int64_t c, int64_t count, pack<acc_t> q_t, pack<acc_t> w,
                                                     pack<acc_t> dq) __attribute__((always_inline)) {
        store(out_s + c, dq * diff_coef - q_t * q_coef, count);
        if (teacher) store(out_t + c, q_t * ((w - kl) * w_coef - t_shift), count);
      });
      out_s[g] = static_cast<acc_t>(k * at_target);
      finish_row(out_s, classes, gs + b * classes);
      if (teacher) {
        out_t[g] = static_cast<acc_t>(k * lam_grad);
        finish_row(out_t, classes, gt + b * classes);
      }
    }
  }
};

// ---- drivers --------------------------------------------------------------------------------------------------

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

// The statistics of a backward call in the accumulation type, [B, width].
at::Tensor backward_stats(const char* op, const at::Tensor& stats, const at::Tensor& x, int64_t width) {
  const at::Tensor st = stats.to(at::toOpMathType(x.scalar_type())).contiguous();
  TORCH_CHECK(st.dim() == 2 && st.size(0) == x.size(0) && st.size(1) == width, op, ": stats must be [B, ", width,
              "], got ", stats.sizes());
  return st;
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

// KD's forward pass: (loss, stats), with the student's gradient for a unit upstream gradient as a third
// tensor when ``with_grad`` (undefined otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_forward(const char* op, const at::Tensor& logits_s,
                                                          const at::Tensor& logits_t, double temperature,
                                                          bool with_grad) {
  check_logits(op, logits_s, logits_t);
  const at::Tensor xs = logits_s.contiguous(), xt = logits_t.contiguous();
  const int64_t rows = xs.size(0), classes = xs.size(1);
  at::Tensor stats = at::empty({rows, 5}, xs.options().dtype(accumulation(xs)));
  at::Tensor grad_s = with_grad ? at::empty_like(xs) : at::Tensor();
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "kd_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run_rows<Bind<KdForward, scalar_t, acc_t>>(
        rows, classes, 4, xs.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), classes,
        static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(temperature / rows), stats.data_ptr<acc_t>(),
        with_grad ? grad_s.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
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
  const at::Tensor st = backward_stats("kd_loss_backward", stats, xs, 5);
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
  at::Tensor stats = at::empty({rows, 7}, xs.options().dtype(accumulation(xs)));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "dkd_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run_rows<Bind<DkdForward, scalar_t, acc_t>>(rows, classes, 4, xs.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(),
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
  const at::Tensor st = backward_stats("dkd_loss_backward", stats, xs, 7);
  at::Tensor grad_s = at::empty_like(xs), grad_t = teacher_grad ? at::empty_like(xt) : xt.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "dkd_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t k = upstream<acc_t>(grad) * static_cast<acc_t>(temperature / rows);
    run_rows<Bind<DkdBackward, scalar_t, acc_t>>(
        rows, classes, 4, xs.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), y.data_ptr<int64_t>(),
        st.data_ptr<acc_t>(), classes, static_cast<acc_t>(1.0 / temperature), k, alpha, beta,
        grad_s.data_ptr<scalar_t>(), teacher_grad ? grad_t.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
  });
  return {grad_s, grad_t};
}

}  // namespace fastkd::cpu

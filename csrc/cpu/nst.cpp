// CPU kernel of NST's op fastkd::nst_loss (fastkd/ops/nst.py): loss and both input gradients.
//
// Per sample, S [C_s, HW] and T [C_t, HW] are the channel-normalised maps. The loss
//   (1/B) sum_b ||S S^T||^2/C_s^2 + ||T T^T||^2/C_t^2 - 2 ||S T^T||^2/(C_s C_t)
// equals (1/B) sum_b ||S^T S / C_s - T^T T / C_t||_F^2, so it is computed from whichever Grams are
// smaller: the HW x HW spatial ones when HW < 1.5 C (fewer multiply-adds: 4 C HW^2 against 6 C^2 HW
// for C_s = C_t = C), else the C x C channel ones. One fused pass normalises the channels (fp32),
// batched GEMMs form the Grams, one fused pass turns them into the loss and dL/dGram in place, two
// more GEMMs give dL/dS and dL/dT, and one fused pass takes them through the normalisation into
// the inputs' dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "ops.h"

namespace fastkd::cpu {
namespace {

constexpr double kEps = 1e-12;  // F.normalize's eps

// unit = x / max(||x_row||, eps) per row of [R, HW], in acc_t; norms kept.
template <typename in_t, typename acc_t>
void normalize_rows(const in_t* x, acc_t* unit, acc_t* norm, int64_t rows, int64_t hw) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const in_t* src = x + r * hw;
      acc_t* dst = unit + r * hw;
      acc_t s = 0;
      for (int64_t k = 0; k < hw; ++k) {
        const acc_t v = static_cast<acc_t>(src[k]);
        dst[k] = v;
        s += v * v;
      }
      const acc_t n = std::sqrt(s);
      norm[r] = n;
      const acc_t inv = acc_t(1) / std::max(n, static_cast<acc_t>(kEps));
      for (int64_t k = 0; k < hw; ++k) dst[k] *= inv;
    }
  });
}

// dL/dx from dL/dunit for unit = x / max(n, eps), in the inputs' dtype.
template <typename in_t, typename acc_t>
void normalize_backward(const acc_t* unit, const acc_t* norm, const acc_t* grad_unit, in_t* grad, int64_t rows,
                        int64_t hw) {
  const acc_t eps = static_cast<acc_t>(kEps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* y = unit + r * hw;
      const acc_t* g = grad_unit + r * hw;
      acc_t inner = 0;
      for (int64_t k = 0; k < hw; ++k) inner += y[k] * g[k];
      if (norm[r] < eps) inner = 0;
      const acc_t inv = acc_t(1) / std::max(norm[r], eps);
      for (int64_t k = 0; k < hw; ++k) grad[r * hw + k] = static_cast<in_t>((g[k] - y[k] * inner) * inv);
    }
  });
}

// Spatial form: a = S^T S, c = T^T T ([B, HW, HW]); loss = sum (a/C_s - c/C_t)^2 / B. In place:
// a <- dL/dS-side matrix 4/(B C_s) (a/C_s - c/C_t), c <- -4/(B C_s C_t) a, so dL/dS = S a, dL/dT = T c.
template <typename acc_t>
double spatial_epilogue(acc_t* a, acc_t* c, int64_t batch, int64_t n, double c_s, double c_t) {
  const acc_t inv_cs = static_cast<acc_t>(1 / c_s), inv_ct = static_cast<acc_t>(1 / c_t);
  const acc_t scale_s = static_cast<acc_t>(4 / (batch * c_s)), scale_t = static_cast<acc_t>(-4 / (batch * c_s * c_t));
  const int64_t rows = batch * n;
  std::vector<double> partial(rows);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* ar = a + r * n;
      acc_t* cr = c + r * n;
      acc_t loss = 0;
      for (int64_t k = 0; k < n; ++k) {
        const acc_t diff = ar[k] * inv_cs - cr[k] * inv_ct;
        loss += diff * diff;
        cr[k] = scale_t * ar[k];
        ar[k] = scale_s * diff;
      }
      partial[r] = static_cast<double>(loss);
    }
  });
  return std::accumulate(partial.begin(), partial.end(), 0.0) / static_cast<double>(batch);
}

// Channel form: kss = S S^T, ktt = T T^T, kst = S T^T. In place: kss <- 4/(B C_s^2) kss,
// kst <- -4/(B C_s C_t) kst, so dL/dS = kss S + kst T and dL/dT = kst^T S.
template <typename acc_t>
double channel_epilogue(acc_t* kss, const acc_t* ktt, acc_t* kst, int64_t batch, int64_t cs, int64_t ct) {
  const double b = static_cast<double>(batch), dcs = static_cast<double>(cs), dct = static_cast<double>(ct);
  const acc_t scale_ss = static_cast<acc_t>(4 / (b * dcs * dcs)), scale_st = static_cast<acc_t>(-4 / (b * dcs * dct));
  std::vector<double> ss(batch), tt(batch), st(batch);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t a = 0, t = 0, x = 0;
      for (int64_t k = i * cs * cs; k < (i + 1) * cs * cs; ++k) {
        a += kss[k] * kss[k];
        kss[k] *= scale_ss;
      }
      for (int64_t k = i * ct * ct; k < (i + 1) * ct * ct; ++k) t += ktt[k] * ktt[k];
      for (int64_t k = i * cs * ct; k < (i + 1) * cs * ct; ++k) {
        x += kst[k] * kst[k];
        kst[k] *= scale_st;
      }
      ss[i] = static_cast<double>(a);
      tt[i] = static_cast<double>(t);
      st[i] = static_cast<double>(x);
    }
  });
  auto total = [](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); };
  return (total(tt) / (dct * dct) + total(ss) / (dcs * dcs) - 2 * total(st) / (dcs * dct)) / b;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> nst_loss(const at::Tensor& f_s, const at::Tensor& f_t) {
  TORCH_CHECK(f_s.device().is_cpu() && f_t.device().is_cpu(), "nst_loss: the CPU kernel needs CPU tensors");
  TORCH_CHECK(f_s.dim() == 3 && f_t.dim() == 3, "nst_loss: expected [B, C, HW] maps, got ", f_s.sizes(), " and ",
              f_t.sizes());
  TORCH_CHECK(f_s.size(0) == f_t.size(0) && f_s.size(2) == f_t.size(2),
              "nst_loss: the maps must share batch size and HW, got ", f_s.sizes(), " and ", f_t.sizes());
  TORCH_CHECK(f_s.scalar_type() == f_t.scalar_type() && at::isFloatingType(f_s.scalar_type()),
              "nst_loss: expected two floating-point maps of one dtype");
  const int64_t batch = f_s.size(0), cs = f_s.size(1), ct = f_t.size(1), hw = f_s.size(2);
  const auto acc = f_s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xs = as_contiguous(f_s), xt = as_contiguous(f_t);
  at::Tensor us = at::empty({batch, cs, hw}, xs.options().dtype(acc)), ut = at::empty({batch, ct, hw}, us.options());
  at::Tensor ns = at::empty({batch * cs}, us.options()), nt = at::empty({batch * ct}, us.options());
  at::Tensor grad_s = at::empty_like(xs), grad_t = at::empty_like(xt);
  double loss = 0;
  const bool spatial = 2 * hw * hw * (cs + ct) < (2 * cs * cs + 3 * cs * ct + ct * ct) * hw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "nst_loss", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "nst_loss_acc", [&] {
      using acc_t = scalar_t;
      normalize_rows(xs.data_ptr<in_t>(), us.data_ptr<acc_t>(), ns.data_ptr<acc_t>(), batch * cs, hw);
      normalize_rows(xt.data_ptr<in_t>(), ut.data_ptr<acc_t>(), nt.data_ptr<acc_t>(), batch * ct, hw);
      at::Tensor dus, dut;
      if (spatial) {
        at::Tensor a = at::bmm(us.transpose(1, 2), us), c = at::bmm(ut.transpose(1, 2), ut);
        loss = spatial_epilogue(a.data_ptr<acc_t>(), c.data_ptr<acc_t>(), batch, hw, static_cast<double>(cs),
                                static_cast<double>(ct));
        dus = at::bmm(us, a);
        dut = at::bmm(ut, c);
      } else {
        at::Tensor kss = at::bmm(us, us.transpose(1, 2)), ktt = at::bmm(ut, ut.transpose(1, 2));
        at::Tensor kst = at::bmm(us, ut.transpose(1, 2));
        loss = channel_epilogue(kss.data_ptr<acc_t>(), ktt.data_ptr<acc_t>(), kst.data_ptr<acc_t>(), batch, cs, ct);
        dus = at::baddbmm(at::bmm(kst, ut), kss, us);
        dut = at::bmm(kst.transpose(1, 2), us);
      }
      normalize_backward(us.data_ptr<acc_t>(), ns.data_ptr<acc_t>(), as_contiguous(dus).data_ptr<acc_t>(),
                         grad_s.data_ptr<in_t>(), batch * cs, hw);
      normalize_backward(ut.data_ptr<acc_t>(), nt.data_ptr<acc_t>(), as_contiguous(dut).data_ptr<acc_t>(),
                         grad_t.data_ptr<in_t>(), batch * ct, hw);
    });
  });
  return {at::scalar_tensor(loss, us.options()), grad_s, grad_t};
}

}  // namespace fastkd::cpu

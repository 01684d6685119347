// Autograd of the batch-relation ops of embeddings (CCKD, PKT, RKD's distance and angle terms) for CPU tensors,
// in C++ (registered at AutogradCPU, which takes precedence over the Python formula that fastkd/ops registers for
// every device). The formula is the same: dL/dX = grad * M X from the saved M. At b = 64 these ops take tens of
// microseconds, and torch.library's Python autograd node around them measured +35-45 us on a 60-70 us full
// step (CCKD, PKT, RKD distance; +54 us on RKD's 0.65 ms angle step). SP and NST, whose steps take milliseconds
// on [64, 256, 8, 8] maps, use the Python formula (the difference was within the machine's noise).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <tuple>

#include "ops.h"

namespace fastkd::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Out2 = std::tuple<at::Tensor, at::Tensor>;
using Out3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The op below autograd, through the dispatcher (so that fake tensors reach their fake kernel and
// modes see the call), under the guard that excludes the autograd keys. Each caller looks its op up once.
template <typename Sig, typename... Args>
auto below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// grad * M X in X's dtype, the product accumulated in M's dtype (M itself when grad is 1).
at::Tensor relation_grad(const at::Tensor& x, const at::Tensor& m, const at::Tensor& grad) {
  const at::Tensor scaled = is_unit_upstream(grad) ? m : m * as_dtype(grad, m.scalar_type());
  return as_dtype(relation_product(scaled, as_dtype(x, m.scalar_type())), x.scalar_type());
}

// Saves (f_s, f_t, m_s[, m_t]) and marks the M's non-differentiable (their gradients are not filled).
void save(AutogradContext* ctx, const at::Tensor& f_s, const at::Tensor& f_t, const variable_list& ms) {
  ctx->set_materialize_grads(false);
  variable_list saved{f_s, f_t};
  saved.insert(saved.end(), ms.begin(), ms.end());
  ctx->save_for_backward(saved);
  ctx->mark_non_differentiable(ms);
}

// (dL/df_s, dL/df_t) from the saved tensors, where an input needs one.
variable_list relation_backward(AutogradContext* ctx, const variable_list& grads, size_t extra_args) {
  const variable_list saved = ctx->get_saved_variables();
  variable_list out(2 + extra_args);
  if (!grads[0].defined()) return out;
  for (size_t i = 0; i < 2 && i + 2 < saved.size(); ++i) {
    if (ctx->needs_input_grad(i)) out[i] = relation_grad(saved[i], saved[i + 2], grads[0]);
  }
  return out;
}

struct CckdFunction : public torch::autograd::Function<CckdFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& e_s, const at::Tensor& e_t, double gamma,
                               int64_t order) {
    static const auto op = find_op<Out3(const at::Tensor&, const at::Tensor&, double, int64_t)>("fastkd::cckd_loss");
    auto [loss, ms, mt] = below_autograd(op, e_s, e_t, gamma, order);
    save(ctx, e_s, e_t, {ms, mt});
    return {loss, ms, mt};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return relation_backward(ctx, grads, 2); }
};

struct PktFunction : public torch::autograd::Function<PktFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& f_s, const at::Tensor& f_t, double eps) {
    static const auto op = find_op<Out3(const at::Tensor&, const at::Tensor&, double)>("fastkd::pkt_loss");
    auto [loss, ms, mt] = below_autograd(op, f_s, f_t, eps);
    save(ctx, f_s, f_t, {ms, mt});
    return {loss, ms, mt};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return relation_backward(ctx, grads, 1); }
};

struct RkdDistanceFunction : public torch::autograd::Function<RkdDistanceFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& f_s, const at::Tensor& f_t) {
    static const auto op = find_op<Out2(const at::Tensor&, const at::Tensor&)>("fastkd::rkd_distance_loss");
    auto [loss, ms] = below_autograd(op, f_s, f_t);
    save(ctx, f_s, f_t, {ms});
    return {loss, ms};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return relation_backward(ctx, grads, 0); }
};

struct RkdAngleFunction : public torch::autograd::Function<RkdAngleFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& f_s, const at::Tensor& f_t) {
    static const auto op = find_op<Out2(const at::Tensor&, const at::Tensor&)>("fastkd::rkd_angle_loss");
    auto [loss, ms] = below_autograd(op, f_s, f_t);
    save(ctx, f_s, f_t, {ms});
    return {loss, ms};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return relation_backward(ctx, grads, 0); }
};

Out3 three(const variable_list& v) {
  return {v[0], v[1], v[2]};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cckd_loss_autograd(const at::Tensor& e_s, const at::Tensor& e_t,
                                                                  double gamma, int64_t order) {
  return three(CckdFunction::apply(e_s, e_t, gamma, order));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pkt_loss_autograd(const at::Tensor& f_s, const at::Tensor& f_t,
                                                                 double eps) {
  return three(PktFunction::apply(f_s, f_t, eps));
}

std::tuple<at::Tensor, at::Tensor> rkd_distance_loss_autograd(const at::Tensor& f_s, const at::Tensor& f_t) {
  const variable_list out = RkdDistanceFunction::apply(f_s, f_t);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_loss_autograd(const at::Tensor& f_s, const at::Tensor& f_t) {
  const variable_list out = RkdAngleFunction::apply(f_s, f_t);
  return {out[0], out[1]};
}

}  // namespace fastkd::cpu

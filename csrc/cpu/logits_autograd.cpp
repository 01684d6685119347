// Autograd of the logit-loss ops for CPU tensors, in C++ (fastkd/ops/logits.py registers the same formula in
// Python for every other device). At 64 × 100 logits the kernels take tens of microseconds and the Python
// autograd wrapper of torch.library several times that; this one keeps a training step's overhead small.
//
// Forward calls the op below autograd through the dispatcher (so fake tensors reach the fake kernel). KD with
// only the student's gradient wanted (the training case) runs fastkd::kd_loss_with_grad, which returns that
// gradient with the loss, and backward scales it; otherwise forward saves the logits and the per-row
// statistics and backward calls the backward op, asking for the teacher's gradient only when the teacher
// logits require it.
#include <ATen/Functions.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <tuple>

#include "ops.h"

namespace fastkd::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Upstream gradient × a gradient taken for a unit upstream gradient in the forward pass. For the usual upstream
// gradient of exactly 1 the tensor is handed on as it is (the autograd engine releases the saved copy before
// the gradient is accumulated, so nothing else holds it).
at::Tensor scaled_by_upstream(const at::Tensor& grad, const at::Tensor& upstream) {
  return is_unit_upstream(upstream) ? grad : at::mul(grad, upstream.to(grad.scalar_type()));
}

class KdFunction : public torch::autograd::Function<KdFunction> {
 public:
  // ``with_grad``: the student's gradient is taken in the forward pass (fastkd::kd_loss_with_grad: the
  // exponentials of a row are computed once for both); backward then only scales it.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits_s, const at::Tensor& logits_t,
                               double temperature, bool with_grad) {
    static const auto kd = op<Pair(const at::Tensor&, const at::Tensor&, double)>("fastkd::kd_loss");
    static const auto kd_with_grad =
        op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>(
            "fastkd::kd_loss_with_grad");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["with_grad"] = with_grad;
    at::Tensor loss, stats;
    if (with_grad) {
      at::Tensor grad_s;
      std::tie(loss, stats, grad_s) = kd_with_grad.call(logits_s, logits_t, temperature);
      ctx->save_for_backward({grad_s});
    } else {
      std::tie(loss, stats) = kd.call(logits_s, logits_t, temperature);
      ctx->save_for_backward({logits_s, logits_t, stats});
      ctx->saved_data["temperature"] = temperature;
    }
    ctx->mark_non_differentiable({stats});
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto kd_backward =
        op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>(
            "fastkd::kd_loss_backward");
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->saved_data["with_grad"].toBool())
      return {scaled_by_upstream(saved[0], grads[0]), at::Tensor(), at::Tensor(), at::Tensor()};
    const bool teacher = ctx->needs_input_grad(1);
    auto [grad_s, grad_t] = kd_backward.call(grads[0], saved[0], saved[1], saved[2],
                                             ctx->saved_data["temperature"].toDouble(), teacher);
    return {grad_s, teacher ? grad_t : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class DkdFunction : public torch::autograd::Function<DkdFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits_s, const at::Tensor& logits_t,
                               const at::Tensor& target, double alpha, double beta, double temperature) {
    static const auto dkd =
        op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double)>("fastkd::dkd_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, stats] = dkd.call(logits_s, logits_t, target, alpha, beta, temperature);
    ctx->save_for_backward({logits_s, logits_t, target, stats});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["temperature"] = temperature;
    ctx->mark_non_differentiable({stats});
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto dkd_backward =
        op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                double, double, bool)>("fastkd::dkd_loss_backward");
    const variable_list saved = ctx->get_saved_variables();
    const bool teacher = ctx->needs_input_grad(1);
    auto [grad_s, grad_t] = dkd_backward.call(
        grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["alpha"].toDouble(),
        ctx->saved_data["beta"].toDouble(), ctx->saved_data["temperature"].toDouble(), teacher);
    return {grad_s, teacher ? grad_t : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

Pair kd_loss_autograd(const at::Tensor& logits_s, const at::Tensor& logits_t, double temperature) {
  // the fused pass when only the student's gradient will be asked for, with fp32 / fp64 logits (a gradient
  // rounded to fp16 / bf16 and then scaled would be rounded twice)
  const bool with_grad = at::GradMode::is_enabled() && logits_s.requires_grad() && !logits_t.requires_grad() &&
                         (logits_s.scalar_type() == at::kFloat || logits_s.scalar_type() == at::kDouble);
  const variable_list out = KdFunction::apply(logits_s, logits_t, temperature, with_grad);
  return {out[0], out[1]};
}

Pair dkd_loss_autograd(const at::Tensor& logits_s, const at::Tensor& logits_t, const at::Tensor& target,
                       double alpha, double beta, double temperature) {
  const variable_list out = DkdFunction::apply(logits_s, logits_t, target, alpha, beta, temperature);
  return {out[0], out[1]};
}

}  // namespace fastkd::cpu

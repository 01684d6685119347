// Declarations of fastkd's CPU kernels (one .cpp per op family).
#pragma once
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastkd::cpu {

// x in dtype / contiguous, without calling the dispatcher when it already is (an op that returns
// its input unchanged is an aliasing error for torch.library's schema checks).
inline at::Tensor as_dtype(const at::Tensor& x, at::ScalarType dtype) {
  return x.scalar_type() == dtype ? x : x.to(dtype);
}
inline at::Tensor as_contiguous(const at::Tensor& x) { return x.is_contiguous() ? x : x.contiguous(); }

// Whether an upstream gradient is exactly 1 (the usual loss.backward()), so that a product with it can be
// skipped. Fake / functional tensors (torch.compile's tracing) have no value to compare: never.
inline bool is_unit_upstream(const at::Tensor& upstream) {
  return !at::isTensorSubclassLike(upstream) && upstream.is_cpu() && upstream.numel() == 1 &&
         upstream.item<double>() == 1.0;
}

// CRD memory bank: bank[index[i]] <- rownorm(momentum * bank[index[i]] + (1 - momentum) * value[i]),
// every new row computed from the rows as they were before the call; when an index repeats,
// its last occurrence wins. All indices are checked before any row is written.
void crd_bank_update_(at::Tensor bank, const at::Tensor& index, const at::Tensor& value, double momentum);

// CRD's NCE loss for both directions with the anchors' gradients (the contract of the Python
// reference fastkd.ops.crd.nce_with_grad_reference), Z as log Z (-inf: not estimated yet):
// returns (loss, log_z_s, log_z_t, grad_v_s, grad_v_t). Refuses an empty batch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> crd_nce(
    const at::Tensor& v_s, const at::Tensor& v_t, const at::Tensor& memory_s, const at::Tensor& memory_t,
    const at::Tensor& idx, const std::optional<at::Tensor>& contrast_idx, const at::Tensor& log_z_s,
    const at::Tensor& log_z_t, const at::Tensor& rng_state, int64_t num_negatives, double temperature,
    double z_momentum, bool shared_negatives);

// crd_nce for M (student, teacher) pairs that share each anchor's contrast rows, in one pass (the contract of
// fastkd.ops.crd.nce_multi_with_grad_reference): v_s, v_t [M, B, D], banks [N, M, D], log Z [M]; returns
// (loss [M], log_z_s [M], log_z_t [M], grad_v_s [M, B, D], grad_v_t [M, B, D]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> crd_nce_multi(
    const at::Tensor& v_s, const at::Tensor& v_t, const at::Tensor& memory_s, const at::Tensor& memory_t,
    const at::Tensor& idx, const std::optional<at::Tensor>& contrast_idx, const at::Tensor& log_z_s,
    const at::Tensor& log_z_t, const at::Tensor& rng_state, int64_t num_negatives, double temperature,
    double z_momentum, bool shared_negatives);

// Logit losses (the contract of fastkd.ops.logits): forward returns (loss, per-row statistics);
// backward returns (d/d logits_s, d/d logits_t), the second empty unless teacher_grad.
std::tuple<at::Tensor, at::Tensor> kd_loss(const at::Tensor& logits_s, const at::Tensor& logits_t, double temperature);
std::tuple<at::Tensor, at::Tensor> kd_loss_backward(const at::Tensor& grad, const at::Tensor& logits_s,
                                                    const at::Tensor& logits_t, const at::Tensor& stats,
                                                    double temperature, bool teacher_grad);
// KD's forward pass with the student's gradient for a unit upstream gradient: (loss, stats, d loss/d logits_s).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_with_grad(const at::Tensor& logits_s, const at::Tensor& logits_t,
                                                               double temperature);
std::tuple<at::Tensor, at::Tensor> dkd_loss(const at::Tensor& logits_s, const at::Tensor& logits_t,
                                            const at::Tensor& target, double alpha, double beta, double temperature);
std::tuple<at::Tensor, at::Tensor> dkd_loss_backward(const at::Tensor& grad, const at::Tensor& logits_s,
                                                     const at::Tensor& logits_t, const at::Tensor& target,
                                                     const at::Tensor& stats, double alpha, double beta,
                                                     double temperature, bool teacher_grad);

// Their autograd for CPU tensors (registered for AutogradCPU): the same formulas as the Python registration.
std::tuple<at::Tensor, at::Tensor> kd_loss_autograd(const at::Tensor& logits_s, const at::Tensor& logits_t,
                                                    double temperature);
std::tuple<at::Tensor, at::Tensor> dkd_loss_autograd(const at::Tensor& logits_s, const at::Tensor& logits_t,
                                                     const at::Tensor& target, double alpha, double beta,
                                                     double temperature);

// G = X X^T of a [n, K] fp32 or fp64 matrix, in X's dtype: the upper triangle by a register-tiled
// kernel (AVX2 + FMA, fp32, where it beats the GEMM), mirrored; at::mm otherwise (gram.cpp).
at::Tensor gram_matrix(const at::Tensor& x);

// Y = M X of a small square [n, n] M and a wide [n, K] X (the relation ops' backward, dL/dX = M X), in X's
// dtype: a register-tiled AVX2 + FMA kernel for fp32 real CPU tensors, at::mm otherwise (gram.cpp).
at::Tensor relation_product(const at::Tensor& m, const at::Tensor& x);

// Batch-relation losses (fastkd/ops/similarity.py): (loss, m_s, m_t) with M = dL/dG + (dL/dG)^T for
// the Gram matrices G = X X^T of the [B, D] inputs, so that dL/dX = M X.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sp_loss(const at::Tensor& f_s, const at::Tensor& f_t);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cckd_loss(const at::Tensor& e_s, const at::Tensor& e_t, double gamma,
                                                         int64_t order);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pkt_loss(const at::Tensor& f_s, const at::Tensor& f_t, double eps);
// IUSP (fastkd/ops/iusp.py): SP inside each sequence of [B, T, C] inputs, over its first lengths[b] frames:
// (loss, m_s, m_t) with m [B, T, T] (zero on the padding), so that dL/dX_b = M_b X_b.
std::tuple<at::Tensor, at::Tensor, at::Tensor> iusp_loss(const at::Tensor& f_s, const at::Tensor& f_t,
                                                         const at::Tensor& lengths);
// RKD's distance term: (loss, m_s); the teacher side has no gradient.
std::tuple<at::Tensor, at::Tensor> rkd_distance_loss(const at::Tensor& f_s, const at::Tensor& f_t);

// NST (fastkd/ops/nst.py) on [B, C, HW] maps: (loss, dL/df_s, dL/df_t).
std::tuple<at::Tensor, at::Tensor, at::Tensor> nst_loss(const at::Tensor& f_s, const at::Tensor& f_t);

// CCKD, PKT and RKD's distance term with their autograd formula in C++ (registered at AutogradCPU).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cckd_loss_autograd(const at::Tensor& e_s, const at::Tensor& e_t,
                                                                  double gamma, int64_t order);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pkt_loss_autograd(const at::Tensor& f_s, const at::Tensor& f_t,
                                                                 double eps);
std::tuple<at::Tensor, at::Tensor> rkd_distance_loss_autograd(const at::Tensor& f_s, const at::Tensor& f_t);

// RKD's angle term: (loss, m_s) like rkd_distance_loss, and its C++ autograd.
std::tuple<at::Tensor, at::Tensor> rkd_angle_loss(const at::Tensor& f_s, const at::Tensor& f_t);
std::tuple<at::Tensor, at::Tensor> rkd_angle_loss_autograd(const at::Tensor& f_s, const at::Tensor& f_t);

}  // namespace fastkd::cpu

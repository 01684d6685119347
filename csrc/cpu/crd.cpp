// CPU kernels of the CRD op family.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ops.h"

namespace fastkd::cpu {
namespace {

// For each position i, whether it is the last occurrence of its index (later rows win).
std::vector<char> last_occurrence(const int64_t* index, int64_t n) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return index[a] < index[b]; });
  std::vector<char> last(n, 0);
  for (int64_t k = 0; k < n; ++k) {
    if (k + 1 == n || index[order[k + 1]] != index[order[k]]) last[order[k]] = 1;
  }
  return last;
}

template <typename bank_t, typename value_t>
void bank_update_kernel(at::Tensor& bank, const at::Tensor& index, const at::Tensor& value, double momentum) {
  using acc_t = at::opmath_type<bank_t>;
  const int64_t rows = index.size(0), dim = bank.size(1);
  bank_t* bank_ptr = bank.data_ptr<bank_t>();
  const value_t* value_ptr = value.data_ptr<value_t>();
  const int64_t* idx = index.data_ptr<int64_t>();
  const acc_t keep = static_cast<acc_t>(momentum), mix = static_cast<acc_t>(1.0 - momentum);

  // Pass 1: the new rows, from the banks as they were before this call.
  std::vector<acc_t> fresh(static_cast<size_t>(rows * dim));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bank_t* old_row = bank_ptr + idx[i] * dim;
      const value_t* v = value_ptr + i * dim;
      acc_t* out = fresh.data() + i * dim;
      acc_t squares = 0;
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t x = keep * static_cast<acc_t>(old_row[d]) + mix * static_cast<acc_t>(v[d]);
        out[d] = x;
        squares += x * x;
      }
      const acc_t inv_norm = acc_t(1) / std::sqrt(squares);
      for (int64_t d = 0; d < dim; ++d) out[d] *= inv_norm;
    }
  });
  // Pass 2: write them; rows written by a later duplicate are skipped.
  const std::vector<char> last = last_occurrence(idx, rows);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!last[i]) continue;
      bank_t* row = bank_ptr + idx[i] * dim;
      const acc_t* src = fresh.data() + i * dim;
      for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<bank_t>(src[d]);
    }
  });
}

}  // namespace

void crd_bank_update_(at::Tensor bank, const at::Tensor& index, const at::Tensor& value, double momentum) {
  TORCH_CHECK(bank.device().is_cpu() && index.device().is_cpu() && value.device().is_cpu(),
              "crd_bank_update_: the CPU kernel needs CPU tensors");
  TORCH_CHECK(bank.dim() == 2 && bank.is_contiguous(), "crd_bank_update_: bank must be a contiguous [N, D] tensor");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "crd_bank_update_: index must be int64 [B]");
  TORCH_CHECK(value.dim() == 2 && value.size(0) == index.size(0) && value.size(1) == bank.size(1),
              "crd_bank_update_: value must be [B, D] with B = len(index) and D = bank.size(1)");
  const at::Tensor idx = index.contiguous();
  const int64_t rows = bank.size(0);
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < rows, "crd_bank_update_: index ", p[i], " is outside [0, ", rows, ")");
  }
  const at::Tensor v = value.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "crd_bank_update_", [&] {
    using bank_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "crd_bank_update_value", [&] {
      bank_update_kernel<bank_t, scalar_t>(bank, idx, v, momentum);
    });
  });
}

}  // namespace fastkd::cpu

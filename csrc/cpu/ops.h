// Declarations of fastkd's CPU kernels (one .cpp per op family).
#pragma once
#include <ATen/core/Tensor.h>

namespace fastkd::cpu {

// CRD memory bank: bank[index[i]] <- rownorm(momentum * bank[index[i]] + (1 - momentum) * value[i]),
// every new row computed from the rows as they were before the call; when an index repeats,
// its last occurrence wins. All indices are checked before any row is written.
void crd_bank_update_(at::Tensor bank, const at::Tensor& index, const at::Tensor& value, double momentum);

}  // namespace fastkd::cpu

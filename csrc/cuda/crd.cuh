// CUDA kernels of the CRD op family: launchers over raw device pointers (no torch here).
//
// Contracts (the torch references in fastkd/ops/crd.py and fastkd/ops/philox.py):
//   nce_forward   fastkd::crd_nce = nce_with_grad_reference: both NCE directions in log space,
//                 Z given and returned as log Z (-inf: estimate it from the batch), every term a
//                 function of log P = s/T - log Z (nothing overflows at any T), the anchors'
//                 gradients produced in the same call;
//   bank_update   fastkd::crd_bank_update_ = bank_update_reference: momentum update and L2
//                 renormalisation from the rows before the call, last occurrence of an index wins.
//
// Every launcher only enqueues kernels on `stream`: no allocation, no host synchronisation and
// no host read of a device value, so a CUDA graph can capture it. The scalars log Z, the RNG state
// and the indices are read on the device. Results are deterministic (fixed-order reductions, no
// floating-point atomics). Launchers return cudaErrorInvalidValue for arguments outside what is
// documented here and otherwise the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastkd::cuda {

// Element type of an anchor, bank, value or gradient tensor.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Columns (of the K+1 per anchor) that one block of the NCE kernels scores.
constexpr int64_t kNceTile = 512;
// Largest embedding width D the NCE kernels accept (any D >= 1 up to this).
constexpr int64_t kNceMaxDim = 1024;

// What both NCE directions share.
struct NceProblem {
  int64_t batch = 0;       // B >= 1
  int64_t cols = 0;        // K + 1 >= 2: the positive in column 0, then K negatives
  int64_t num_data = 0;    // N = rows of each bank, 1 <= N < 2^32
  // Where the rows come from: either contrast_idx, [B, cols] int64 row-major, or (when it is
  // null) idx, [B] int64, for column 0 and Philox4x32-10 for columns 1..K with
  // rng_state = {seed, offset}, int64[2] on the device (fastkd/ops/philox.py's contract).
  // Out-of-range indices (explicit or idx) are clamped to [0, N) for reading; they are never
  // dereferenced outside the bank. The Python side rejects them before calling when it checks.
  const int64_t* contrast_idx = nullptr;
  const int64_t* idx = nullptr;
  const int64_t* rng_state = nullptr;
  bool shared_negatives = false;  // Philox counter n = k-1 for every anchor instead of b*K + k-1
  double temperature = 0.07;      // T > 0
  double z_momentum = 0.0;        // known Z <- m*Z + (1-m)*estimate after being used (0: Z fixed)
};

// One direction: anchors [B, dim] scored against a bank [N, dim] (both row-major, contiguous).
struct NceSide {
  const void* anchor = nullptr;
  DType anchor_dtype = DType::kFloat32;
  const void* bank = nullptr;
  DType bank_dtype = DType::kFloat32;
  int64_t dim = 0;              // 1 <= dim <= kNceMaxDim
  const float* log_z = nullptr;  // [1] fp32: log of the normalisation constant; -inf means "estimate it"
  float* log_z_new = nullptr;    // [1] fp32 out: log Z after this step (must not alias log_z)
  void* grad = nullptr;         // [B, dim] out, anchor_dtype: d loss / d anchor
};

// Bytes of device scratch nce_forward needs (max_dim = the larger dim of the two sides):
// logits s/T [B, cols] fp32, log-sum-exp partials [B, tiles] x 2 fp32, gradient partials
// [B, tiles, max_dim] fp32, loss partials [2, B, tiles] fp32 and one fp32 log Z, each section
// 256-byte aligned; tiles = ceil(cols / kNceTile).
size_t nce_workspace_bytes(int64_t batch, int64_t cols, int64_t max_dim);

// loss[0] = NCE(student side) + NCE(teacher side), fp32; each side also writes log_z_new and grad.
// `student` is (v_s, memory_t, log_z_s), `teacher` is (v_t, memory_s, log_z_t). workspace must hold
// nce_workspace_bytes(...) bytes (256-byte aligned) and is reused by both sides in stream order.
cudaError_t nce_forward(const NceProblem& problem, const NceSide& student, const NceSide& teacher, float* loss,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream);

// bank[index[i]] <- rownorm(momentum * bank[index[i]] + (1 - momentum) * value[i]) for the last
// occurrence i of each index, computed from the row before the call. bank [num_rows, dim] and
// value [count, dim] row-major contiguous, index [count] int64. An index outside [0, num_rows)
// is skipped: nothing is read or written for it.
cudaError_t bank_update(void* bank, DType bank_dtype, int64_t num_rows, int64_t dim, const int64_t* index,
                        int64_t count, const void* value, DType value_dtype, double momentum, cudaStream_t stream);

}  // namespace fastkd::cuda

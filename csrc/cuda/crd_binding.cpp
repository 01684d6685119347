// Torch bindings of the CRD CUDA kernels (crd.cu): input checks, outputs and scratch allocated
// by torch on the current stream, and the registrations for the schemas that fastkd/ops defines
// in Python:
//   crd_nce_cuda(Tensor v_s, Tensor v_t, Tensor memory_s, Tensor memory_t, Tensor idx,
//                Tensor? contrast_idx, Tensor log_z_s, Tensor log_z_t, Tensor rng_state, int num_negatives,
//                float temperature, float z_momentum, bool shared_negatives)
//       -> (loss, log_z_s_new, log_z_t_new, grad_v_s, grad_v_t)  (= nce_with_grad_reference)
//     log Z = -inf: estimate Z from the batch. An empty batch is refused before anything runs.
//   crd_bank_update_cuda_(Tensor(a!) bank, Tensor index, Tensor value, float momentum) -> ()
//                                                               (= bank_update_reference)
// Nothing here reads a device value on the host, so both can be captured in a CUDA graph. Index
// values are not checked here (that would need a host sync): the kernels clamp out-of-range
// indices when reading a bank and skip them when updating one (see crd.cuh); the Python side
// validates them before calling when value checks are on.
#ifdef FASTKD_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "crd.cuh"

namespace fastkd::cuda {
namespace {

bool supported(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(supported(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

void check_cuda(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other inputs are on ", device);
}

void check_ok(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// A one-element fp32 view of log Z (a copy on the stream when it is stored in another type).
at::Tensor log_z_as_float(const at::Tensor& z, const at::Device& device, const char* name) {
  const char* op = "crd_nce_cuda";
  check_cuda(z, device, op, name);
  TORCH_CHECK(z.numel() == 1, op, ": ", name, " must hold one value, got shape ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), op, ": ", name, " must be floating point, got ", z.scalar_type());
  return z.to(at::kFloat).contiguous().view({1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> crd_nce_cuda(
    const at::Tensor& v_s, const at::Tensor& v_t, const at::Tensor& memory_s, const at::Tensor& memory_t,
    const at::Tensor& idx, const std::optional<at::Tensor>& contrast_idx, const at::Tensor& log_z_s,
    const at::Tensor& log_z_t, const at::Tensor& rng_state, int64_t num_negatives, double temperature,
    double z_momentum, bool shared_negatives) {
  const char* op = "crd_nce_cuda";
  TORCH_CHECK(v_s.is_cuda(), op, ": v_s must be a CUDA tensor, got one on ", v_s.device());
  const at::Device device = v_s.device();
  check_cuda(v_t, device, op, "v_t");
  check_cuda(memory_s, device, op, "memory_s");
  check_cuda(memory_t, device, op, "memory_t");

  TORCH_CHECK(v_s.dim() == 2 && v_t.dim() == 2, op, ": v_s and v_t must be [B, D], got ", v_s.sizes(), " and ",
              v_t.sizes());
  // an empty batch would estimate Z from no score at all (log 0): refused before anything is enqueued
  TORCH_CHECK(v_s.size(0) >= 1, op, ": v_s has 0 rows (shape ", v_s.sizes(),
              "); the op needs an [B, D] batch with B >= 1");
  TORCH_CHECK(memory_s.dim() == 2 && memory_t.dim() == 2, op, ": memory_s and memory_t must be [N, D], got ",
              memory_s.sizes(), " and ", memory_t.sizes());
  TORCH_CHECK(memory_s.is_contiguous() && memory_t.is_contiguous(), op,
              ": memory_s and memory_t must be contiguous");
  const int64_t batch = v_s.size(0);
  const int64_t num_data = memory_s.size(0);
  TORCH_CHECK(batch >= 1 && v_t.size(0) == batch, op, ": v_s and v_t must have the same B >= 1 rows, got ",
              v_s.size(0), " and ", v_t.size(0));
  TORCH_CHECK(num_data >= 1 && memory_t.size(0) == num_data, op,
              ": memory_s and memory_t must have the same N >= 1 rows, got ", memory_s.size(0), " and ",
              memory_t.size(0));
  // the reference computes (word · N) >> 32 in int64, which is exact for N < 2^31
  TORCH_CHECK(num_data <= INT32_MAX, op, ": the banks may have at most 2^31 - 1 rows, got ", num_data);
  TORCH_CHECK(v_s.size(1) == memory_t.size(1), op, ": v_s is [B, ", v_s.size(1), "] but memory_t is [N, ",
              memory_t.size(1), "]");
  TORCH_CHECK(v_t.size(1) == memory_s.size(1), op, ": v_t is [B, ", v_t.size(1), "] but memory_s is [N, ",
              memory_s.size(1), "]");
  for (const int64_t dim : {v_s.size(1), v_t.size(1)}) {
    TORCH_CHECK(dim >= 1 && dim <= kNceMaxDim, op, ": the embedding width must be in [1, ", kNceMaxDim, "], got ",
                dim);
  }
  const DType v_s_type = dtype_of(v_s, op, "v_s"), v_t_type = dtype_of(v_t, op, "v_t");
  const DType mem_s_type = dtype_of(memory_s, op, "memory_s"), mem_t_type = dtype_of(memory_t, op, "memory_t");
  TORCH_CHECK(temperature > 0.0, op, ": temperature must be positive, got ", temperature);
  TORCH_CHECK(z_momentum >= 0.0 && z_momentum <= 1.0, op, ": z_momentum must be in [0, 1], got ", z_momentum);

  NceProblem problem;
  problem.batch = batch;
  problem.num_data = num_data;
  problem.temperature = temperature;
  problem.z_momentum = z_momentum;
  problem.shared_negatives = shared_negatives;
  at::Tensor cidx, idx_c, rng;
  const bool explicit_idx = contrast_idx.has_value() && contrast_idx->defined();
  if (explicit_idx) {
    check_cuda(*contrast_idx, device, op, "contrast_idx");
    TORCH_CHECK(contrast_idx->dim() == 2 && contrast_idx->size(0) == batch && contrast_idx->size(1) >= 2 &&
                    contrast_idx->scalar_type() == at::kLong,
                op, ": contrast_idx must be int64 [B, K+1] with B = ", batch, " and K >= 1, got ",
                contrast_idx->scalar_type(), " ", contrast_idx->sizes());
    cidx = contrast_idx->contiguous();
    problem.cols = cidx.size(1);
    problem.contrast_idx = cidx.data_ptr<int64_t>();
  } else {  // idx and rng_state are only read here, as in the reference
    check_cuda(idx, device, op, "idx");
    check_cuda(rng_state, device, op, "rng_state");
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == batch && idx.scalar_type() == at::kLong, op,
                ": idx must be int64 [B] with B = ", batch, ", got ", idx.scalar_type(), " ", idx.sizes());
    TORCH_CHECK(num_negatives >= 1, op, ": num_negatives must be >= 1, got ", num_negatives);
    TORCH_CHECK(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong, op,
                ": rng_state must be int64 (seed, offset), got ", rng_state.scalar_type(), " ", rng_state.sizes());
    idx_c = idx.contiguous();
    rng = rng_state.contiguous();
    problem.cols = num_negatives + 1;
    problem.idx = idx_c.data_ptr<int64_t>();
    problem.rng_state = rng.data_ptr<int64_t>();
  }

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor zs = log_z_as_float(log_z_s, device, "log_z_s"), zt = log_z_as_float(log_z_t, device, "log_z_t");
  const at::Tensor a_s = v_s.contiguous(), a_t = v_t.contiguous();
  const auto f32 = v_s.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor z_s_new = at::empty({1}, f32), z_t_new = at::empty({1}, f32);
  at::Tensor grad_s = at::empty({batch, a_s.size(1)}, v_s.options());
  at::Tensor grad_t = at::empty({batch, a_t.size(1)}, v_t.options());
  const int64_t max_dim = a_s.size(1) > a_t.size(1) ? a_s.size(1) : a_t.size(1);
  const size_t bytes = nce_workspace_bytes(batch, problem.cols, max_dim);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, v_s.options().dtype(at::kByte));

  NceSide student;  // student anchors against the teacher bank
  student.anchor = a_s.data_ptr();
  student.anchor_dtype = v_s_type;
  student.bank = memory_t.data_ptr();
  student.bank_dtype = mem_t_type;
  student.dim = a_s.size(1);
  student.log_z = zs.data_ptr<float>();
  student.log_z_new = z_s_new.data_ptr<float>();
  student.grad = grad_s.data_ptr();
  NceSide teacher;  // teacher anchors against the student bank
  teacher.anchor = a_t.data_ptr();
  teacher.anchor_dtype = v_t_type;
  teacher.bank = memory_s.data_ptr();
  teacher.bank_dtype = mem_s_type;
  teacher.dim = a_t.size(1);
  teacher.log_z = zt.data_ptr<float>();
  teacher.log_z_new = z_t_new.data_ptr<float>();
  teacher.grad = grad_t.data_ptr();

  check_ok(nce_forward(problem, student, teacher, loss.data_ptr<float>(), workspace.data_ptr(), bytes,
                       c10::cuda::getCurrentCUDAStream()),
           op);
  // log Z comes back in its own dtype and shape (a stream-ordered cast, no sync)
  return {loss, z_s_new.view(log_z_s.sizes()).to(log_z_s.scalar_type()),
          z_t_new.view(log_z_t.sizes()).to(log_z_t.scalar_type()), grad_s, grad_t};
}

void crd_bank_update_cuda_(at::Tensor bank, const at::Tensor& index, const at::Tensor& value, double momentum) {
  const char* op = "crd_bank_update_cuda_";
  TORCH_CHECK(bank.is_cuda(), op, ": bank must be a CUDA tensor, got one on ", bank.device());
  const at::Device device = bank.device();
  check_cuda(index, device, op, "index");
  check_cuda(value, device, op, "value");
  TORCH_CHECK(bank.dim() == 2 && bank.is_contiguous(), op, ": bank must be a contiguous [N, D] tensor, got ",
              bank.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op, ": index must be int64 [B], got ",
              index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(value.dim() == 2 && value.size(0) == index.size(0) && value.size(1) == bank.size(1), op,
              ": value must be [B, D] with B = len(index) = ", index.size(0), " and D = bank.size(1) = ", bank.size(1),
              ", got ", value.sizes());
  const DType bank_type = dtype_of(bank, op, "bank"), value_type = dtype_of(value, op, "value");
  if (index.numel() == 0 || bank.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor idx = index.contiguous(), v = value.contiguous();
  check_ok(bank_update(bank.data_ptr(), bank_type, bank.size(0), bank.size(1), idx.data_ptr<int64_t>(), idx.numel(),
                       v.data_ptr(), value_type, momentum, c10::cuda::getCurrentCUDAStream()),
           op);
}

}  // namespace
}  // namespace fastkd::cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("crd_nce_cuda", &fastkd::cuda::crd_nce_cuda);
  m.impl("crd_bank_update_cuda_", &fastkd::cuda::crd_bank_update_cuda_);
}

#endif  // FASTKD_WITH_CUDA

// CUDA kernels of the CRD op family; the contracts are in crd.cuh.
//
// NCE, one direction (anchors [B, D] against a bank [N, D]), four kernels in stream order:
//
//   pass 1  grid B * tiles, one block per (anchor b, tile of kNceTile columns). The block puts
//           its columns' row indices in shared memory (Philox or contrast_idx), keeps the anchor
//           in registers (fp32) and gathers the rows with 16-byte loads, `lanes` threads per row,
//           several rows in flight per thread; the dot products (fp32) give x = s/T. It writes
//           the block's (max, sum exp(x - max)) partial of the batch log-sum-exp. When Z is
//           already known (log Z > -inf, read on the device) it also finishes the step in the same
//           pass: log P = x - log Z, the NCE terms and d loss/d s, and accumulates d·row into
//           the anchor gradient while the row is in registers (one gather per step). When Z is
//           unknown it stores x in the [B, K+1] logits buffer instead.
//   z       one block: log Z from the partials in a fixed order (fp64), log Z's new value (batch
//           estimate, or the EMA of a known Z, a log-add-exp), log Z for pass 2.
//   pass 2  same grid; returns at once when Z was known. Otherwise reads x back, computes the
//           NCE terms with the estimated log Z and gathers the rows a second time for the
//           gradient (the first step only).
//   grad    grid B: sums the per-tile gradient partials in tile order and casts to the anchor type.
//
// and after both directions one block sums the per-block loss partials in a fixed order. No
// floating-point atomics anywhere, so results are bitwise reproducible. No B x (K+1) x D tensor
// exists; per step the scratch is the [B, K+1] fp32 logits plus O(B * tiles * D) partials.
//
// Bank update: one warp per batch row. Only the last occurrence of an index writes, and it is
// also the only warp that reads that bank row, so reading the old row and writing the new one
// in the same kernel is race-free: every new row comes from the row before the call.
#include "crd.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fastkd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kTile = static_cast<int>(kNceTile);
constexpr double kNceEps = 1e-7;  // NCE_EPS of fastkd/ops/crd.py

// ---------------------------------------------------------------------------------------------
// Philox4x32-10, word 0 only (fastkd/ops/philox.py).

constexpr uint32_t kPhiloxMulA = 0xD2511F53u;
constexpr uint32_t kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

__host__ __device__ __forceinline__ uint32_t mul_hi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ uint32_t philox_word0(uint64_t seed, uint64_t offset, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mul_hi32(kPhiloxMulB, c2), lo_b = kPhiloxMulB * c2;  // 32-bit wraparound
    const uint32_t hi_a = mul_hi32(kPhiloxMulA, c0), lo_a = kPhiloxMulA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// (word0 · N) >> 32: uniform over [0, N) for N < 2^32.
__host__ __device__ __forceinline__ int64_t philox_row(uint32_t word, int64_t num_data) {
  return static_cast<int64_t>((static_cast<uint64_t>(word) * static_cast<uint64_t>(num_data)) >> 32);
}

// ---------------------------------------------------------------------------------------------
// Element types: storage bits and fp32 conversions (no half operators: torch builds with
// __CUDA_NO_HALF_OPERATORS__ and friends).

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Bits = float;
  static __device__ __forceinline__ float to_float(Bits x) { return x; }
  static __device__ __forceinline__ Bits from_float(float x) { return x; }
  static __device__ __forceinline__ void unpack(const uint4& w, float* out) {
    out[0] = __uint_as_float(w.x);
    out[1] = __uint_as_float(w.y);
    out[2] = __uint_as_float(w.z);
    out[3] = __uint_as_float(w.w);
  }
};

// 16-bit types: the element at the lower address is the low half of a little-endian word.
template <typename Half>
struct Elem16 {
  using Bits = unsigned short;
  static __device__ __forceinline__ void unpack(const uint4& w, float* out) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = Half::to_float(static_cast<Bits>(words[i] & 0xffffu));
      out[2 * i + 1] = Half::to_float(static_cast<Bits>(words[i] >> 16));
    }
  }
};

template <>
struct Elem<__half> : Elem16<Elem<__half>> {
  static __device__ __forceinline__ float to_float(Bits x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ Bits from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <>
struct Elem<__nv_bfloat16> : Elem16<Elem<__nv_bfloat16>> {
  static __device__ __forceinline__ float to_float(Bits x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
  static __device__ __forceinline__ Bits from_float(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

__device__ __forceinline__ float load_as_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return Elem<__half>::to_float(static_cast<const unsigned short*>(base)[i]);
    case DType::kBFloat16:
      return Elem<__nv_bfloat16>::to_float(static_cast<const unsigned short*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* base, DType dtype, int64_t i, float x) {
  switch (dtype) {
    case DType::kFloat16:
      static_cast<unsigned short*>(base)[i] = Elem<__half>::from_float(x);
      break;
    case DType::kBFloat16:
      static_cast<unsigned short*>(base)[i] = Elem<__nv_bfloat16>::from_float(x);
      break;
    default:
      static_cast<float*>(base)[i] = x;
  }
}

// ---------------------------------------------------------------------------------------------
// NCE pieces shared by the kernels.

struct PassParams {
  int64_t batch, cols, num_data, tiles, dim;
  const int64_t* contrast_idx;
  const int64_t* idx;
  const int64_t* rng_state;
  bool shared_negatives;
  float temperature;  // T
  float log_c;        // log(noise + eps), noise = K/N
  float kappa;        // log1p(eps / noise): the constant of every negative's term
  float d_scale;      // -1 / (B·T): d loss / d s = d_scale · d loss-term / d x
  int lanes;          // threads per bank row: a power of two <= 32
  int chunks;         // loads per bank row: dim / VEC
  const void* anchor;
  DType anchor_dtype;
  const void* bank;
  const float* log_z_in;  // log Z as given, -inf: estimate it
  const float* log_z;     // pass 2: log Z written by z_kernel
  float* logits;        // [B, cols] x = s/T (only written when Z is unknown)
  float2* lse;          // [B * tiles] (max, sum exp(x - max))
  float* grad_part;     // [B * tiles, dim]
  float* loss_part;     // [B * tiles] this side's slot
};

__device__ __forceinline__ int64_t clamp_row(int64_t row, int64_t num_data) {
  return row < 0 ? 0 : (row >= num_data ? num_data - 1 : row);
}

// The bank row of column `col` of anchor b.
__device__ __forceinline__ int64_t column_row(const PassParams& p, int64_t b, int64_t col) {
  if (p.contrast_idx != nullptr) return clamp_row(p.contrast_idx[b * p.cols + col], p.num_data);
  if (col == 0) return clamp_row(p.idx[b], p.num_data);
  const int64_t k = p.cols - 1;
  const uint64_t counter = static_cast<uint64_t>(p.shared_negatives ? col - 1 : b * k + col - 1);
  const uint32_t word = philox_word0(static_cast<uint64_t>(p.rng_state[0]), static_cast<uint64_t>(p.rng_state[1]),
                                     counter);
  return philox_row(word, p.num_data);
}

// Whether a given log Z is known: -inf (or NaN) asks for the batch estimate.
__device__ __forceinline__ bool log_z_known(float log_z) { return log_z > -INFINITY; }

// softplus(x) = log(1 + e^x) and sigmoid(x) = 1 / (1 + e^-x) from one exponential, finite and
// accurate for every x.
__device__ __forceinline__ void softplus_sigmoid(float x, float& softplus, float& sigmoid) {
  const float e = expf(-fabsf(x));
  softplus = fmaxf(x, 0.0f) + log1pf(e);
  sigmoid = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

struct NceTerm {
  float loss;     // the column's term inside -(1/B) Σ
  float d_score;  // d loss / d s of the column
};

// From log P = x - log Z (P itself is never formed: Z spans e^(+-1/T) and overflows fp32 at
// small T), c = noise + eps. Positive (column 0): log(P / (P + c)) = -softplus(log c - log P),
// d/dx = c / (P + c) = sigmoid(log c - log P). Negative: log(noise / (P + c)) =
// -log1p(eps / noise) - softplus(log P - log c), d/dx = -sigmoid(log P - log c). The softplus
// (log1p) form keeps the negatives' terms (about -P/noise, ~1/K each) accurate in fp32, where
// log(noise) - log(P + c) loses them to cancellation (a bias of about 1e-4 of the loss at
// K = 16384, N = 50,000).
__device__ __forceinline__ NceTerm nce_term(float x, bool positive, float log_z, const PassParams& p) {
  const float log_p = x - log_z;
  float softplus, sigmoid;
  softplus_sigmoid(positive ? p.log_c - log_p : log_p - p.log_c, softplus, sigmoid);
  NceTerm t;
  t.loss = positive ? -softplus : -p.kappa - softplus;
  t.d_score = (positive ? sigmoid : -sigmoid) * p.d_scale;
  return t;
}

// Running log-sum-exp: max m and Σ exp(x - m).
struct Lse {
  float m;
  float s;
};

__device__ __forceinline__ void lse_add(Lse& a, float x) {
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;
    a.m = x;
  } else {
    a.s += expf(x - a.m);
  }
}

__device__ __forceinline__ Lse lse_merge(const Lse& a, const Lse& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

template <typename Raw, typename Bits>
__device__ __forceinline__ Raw load_raw(const Bits* at) {
  if constexpr (std::is_same<Raw, uint4>::value) {
    return __ldg(reinterpret_cast<const uint4*>(at));
  } else {
    return __ldg(at);
  }
}

template <typename T, int VEC, typename Raw>
__device__ __forceinline__ void unpack(const Raw& raw, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = Elem<T>::to_float(raw);
  } else {
    Elem<T>::unpack(raw, out);
  }
}

// ---------------------------------------------------------------------------------------------
// The NCE passes (see the top of the file). T: bank element type; VEC: elements per load
// (16 bytes, or 1 when the rows are not 16-byte aligned); MAXC: loads per thread per row.

template <typename T, int VEC, int MAXC>
__global__ void __launch_bounds__(kThreads) nce_pass_kernel(const PassParams p, const int pass) {
  using Bits = typename Elem<T>::Bits;
  using Raw = typename std::conditional<VEC == 1, Bits, uint4>::type;
  constexpr int kRowsInFlight = MAXC >= 4 ? 1 : 4 / MAXC;  // rows each thread loads before using them

  const float log_z_in = __ldg(p.log_z_in);
  const bool z_known = log_z_known(log_z_in);
  if (pass == 2 && z_known) return;  // pass 1 already produced the loss and gradient partials
  const bool with_grad = z_known || pass == 2;

  __shared__ int64_t rows_s[kTile];
  __shared__ float logits_s[kTile];
  __shared__ Lse lse_s[kWarps];
  __shared__ float loss_s[kWarps];
  extern __shared__ float grad_s[];  // [kWarps, dim]

  const int64_t block = blockIdx.x;
  const int64_t b = block / p.tiles;
  const int64_t col0 = (block % p.tiles) * kTile;
  const int ncol = static_cast<int>(p.cols - col0 < kTile ? p.cols - col0 : kTile);
  for (int j = threadIdx.x; j < ncol; j += kThreads) {
    rows_s[j] = column_row(p, b, col0 + j);
    if (pass == 2) logits_s[j] = p.logits[b * p.cols + col0 + j];
  }

  const int lanes = p.lanes;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lig = threadIdx.x & (lanes - 1);  // lane in the group of `lanes` threads sharing a row
  const int group = threadIdx.x / lanes;
  const int groups = kThreads / lanes;

  float anchor[MAXC][VEC];
  float grad[MAXC][VEC];
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int chunk = lig + c * lanes;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      grad[c][e] = 0.0f;
      anchor[c][e] = (pass == 1 && chunk < p.chunks)
                         ? load_as_float(p.anchor, p.anchor_dtype, b * p.dim + chunk * VEC + e)
                         : 0.0f;
    }
  }
  const float log_z = pass == 1 ? log_z_in : *p.log_z;  // pass 1 uses it only when Z is known
  Lse lse{-INFINITY, 0.0f};
  float loss = 0.0f;
  const Bits* bank = static_cast<const Bits*>(p.bank);
  __syncthreads();

  // Every thread runs the same number of iterations (the shuffles below need the whole warp).
  for (int base = 0; base < ncol; base += groups * kRowsInFlight) {
    Raw raw[kRowsInFlight][MAXC];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int j = base + u * groups + group;
      const Bits* row = bank + (j < ncol ? rows_s[j] : 0) * p.dim;
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int chunk = lig + c * lanes;
        raw[u][c] = (j < ncol && chunk < p.chunks) ? load_raw<Raw>(row + chunk * VEC) : Raw{};
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int j = base + u * groups + group;
      float f[MAXC][VEC];
#pragma unroll
      for (int c = 0; c < MAXC; ++c) unpack<T, VEC>(raw[u][c], f[c]);
      float x;
      if (pass == 1) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < MAXC; ++c) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot += f[c][e] * anchor[c][e];
        }
        for (int offset = lanes / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(kFullMask, dot, offset);
        x = dot / p.temperature;
      } else {
        x = j < ncol ? logits_s[j] : 0.0f;
      }
      if (j < ncol) {
        if (pass == 1) lse_add(lse, x);
        if (with_grad) {
          const NceTerm t = nce_term(x, col0 + j == 0, log_z, p);
          loss += t.loss;
#pragma unroll
          for (int c = 0; c < MAXC; ++c) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) grad[c][e] += t.d_score * f[c][e];
          }
        } else if (lig == 0) {
          p.logits[b * p.cols + col0 + j] = x;
        }
      }
    }
  }

  // Block reductions, each in a fixed order. Every thread of a group holds the same lse and
  // loss (the group's dot products are reduced with butterflies), so only lane 0 of a group
  // contributes them.
  if (pass == 1) {
    Lse mine = lig == 0 ? lse : Lse{-INFINITY, 0.0f};
    for (int offset = 16; offset > 0; offset >>= 1) {
      const Lse other{__shfl_xor_sync(kFullMask, mine.m, offset), __shfl_xor_sync(kFullMask, mine.s, offset)};
      mine = lse_merge(mine, other);
    }
    if (lane == 0) lse_s[warp] = mine;
  }
  if (with_grad) {
    float mine = lig == 0 ? loss : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) mine += __shfl_xor_sync(kFullMask, mine, offset);
    if (lane == 0) loss_s[warp] = mine;
    // Groups of the same warp hold the same columns of the gradient: add them first.
    for (int offset = lanes; offset < 32; offset <<= 1) {
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) grad[c][e] += __shfl_xor_sync(kFullMask, grad[c][e], offset);
      }
    }
    if (lane < lanes) {
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int chunk = lane + c * lanes;
        if (chunk < p.chunks) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) grad_s[warp * p.dim + chunk * VEC + e] = grad[c][e];
        }
      }
    }
  }
  __syncthreads();
  if (pass == 1 && threadIdx.x == 0) {
    Lse total = lse_s[0];
    for (int w = 1; w < kWarps; ++w) total = lse_merge(total, lse_s[w]);
    p.lse[block] = make_float2(total.m, total.s);
  }
  if (with_grad) {
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int w = 0; w < kWarps; ++w) total += loss_s[w];
      p.loss_part[block] = total;
    }
    for (int64_t d = threadIdx.x; d < p.dim; d += kThreads) {
      float total = 0.0f;
      for (int w = 0; w < kWarps; ++w) total += grad_s[w * p.dim + d];
      p.grad_part[block * p.dim + d] = total;
    }
  }
}

// log of the batch estimate mean(exp(x))·N from the partials, then log Z's new value and the
// log Z pass 2 uses. With `moving`, a known Z becomes m·Z + (1 - m)·estimate: log_m = log m and
// log_1m = log(1 - m). One block.
__global__ void __launch_bounds__(kThreads)
    z_kernel(const float2* lse, int64_t count, double log_scale, const float* log_z_in, float* log_z_new,
             float* log_z, bool moving, double log_m, double log_1m) {
  __shared__ float max_s[kWarps];
  __shared__ double sum_s[kThreads];
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) m = fmaxf(m, lse[i].x);
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, offset));
  if ((threadIdx.x & 31) == 0) max_s[threadIdx.x >> 5] = m;
  __syncthreads();
  float top = max_s[0];
  for (int w = 1; w < kWarps; ++w) top = fmaxf(top, max_s[w]);
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const float2 part = lse[i];
    if (part.x != -INFINITY) s += static_cast<double>(part.y) * exp(static_cast<double>(part.x) - top);
  }
  sum_s[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) sum_s[threadIdx.x] += sum_s[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double log_estimate = static_cast<double>(top) + log(sum_s[0]) + log_scale;
    const float current = *log_z_in;
    if (!log_z_known(current)) {
      *log_z = static_cast<float>(log_estimate);
      *log_z_new = static_cast<float>(log_estimate);
    } else {
      *log_z = current;
      const double a = log_m + current, b = log_1m + log_estimate;  // log(m Z + (1 - m) estimate)
      *log_z_new = moving ? static_cast<float>(fmax(a, b) + log1p(exp(-fabs(a - b)))) : current;
    }
  }
}

// grad[b, :] = Σ over tiles (in order) of the partials, cast to the anchor type. Grid B.
__global__ void __launch_bounds__(kThreads)
    grad_finalize_kernel(const float* grad_part, int64_t tiles, int64_t dim, void* grad, DType dtype) {
  const int64_t b = blockIdx.x;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    double total = 0.0;
    for (int64_t t = 0; t < tiles; ++t) total += grad_part[(b * tiles + t) * dim + d];
    store_from_float(grad, dtype, b * dim + d, static_cast<float>(total));
  }
}

// loss = Σ over the two sides of -(1/B) Σ terms; a fixed-order tree per side. One block.
__global__ void __launch_bounds__(kThreads)
    loss_kernel(const float* loss_part, int64_t count, double inv_batch, float* loss) {
  __shared__ double sum_s[kThreads];
  float result = 0.0f;
  for (int side = 0; side < 2; ++side) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < count; i += kThreads) s += loss_part[side * count + i];
    sum_s[threadIdx.x] = s;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (static_cast<int>(threadIdx.x) < stride) sum_s[threadIdx.x] += sum_s[threadIdx.x + stride];
      __syncthreads();
    }
    result += static_cast<float>(-sum_s[0] * inv_batch);
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = result;
}

// ---------------------------------------------------------------------------------------------
// Bank update: one warp per batch row i; the last occurrence of each in-range index writes.

template <typename BankT, typename ValueT>
__global__ void __launch_bounds__(kThreads)
    bank_update_kernel(typename Elem<BankT>::Bits* bank, int64_t num_rows, int64_t dim, const int64_t* index,
                       int64_t count, const typename Elem<ValueT>::Bits* value, float keep, float mix) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (i >= count) return;  // warp-uniform
  const int64_t row = index[i];
  if (row < 0 || row >= num_rows) return;  // out of range: skipped
  bool later = false;
  for (int64_t j = i + 1 + lane; j < count; j += 32) later |= index[j] == row;
  if (__any_sync(kFullMask, later)) return;  // a later occurrence writes this row

  typename Elem<BankT>::Bits* target = bank + row * dim;
  const typename Elem<ValueT>::Bits* source = value + i * dim;
  // momentum·old + (1 - momentum)·value, rounded step by step as the reference does.
  auto mixed = [&](int64_t d) {
    return __fadd_rn(__fmul_rn(Elem<BankT>::to_float(target[d]), keep),
                     __fmul_rn(Elem<ValueT>::to_float(source[d]), mix));
  };
  float squares = 0.0f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float x = mixed(d);
    squares = __fmaf_rn(x, x, squares);
  }
  for (int offset = 16; offset > 0; offset >>= 1) squares += __shfl_xor_sync(kFullMask, squares, offset);
  const float norm = __fsqrt_rn(squares);
  for (int64_t d = lane; d < dim; d += 32) target[d] = Elem<BankT>::from_float(__fdiv_rn(mixed(d), norm));
}

// ---------------------------------------------------------------------------------------------
// Host side.

size_t align256(size_t bytes) { return (bytes + 255) & ~static_cast<size_t>(255); }

int64_t tiles_of(int64_t cols) { return (cols + kNceTile - 1) / kNceTile; }

struct Workspace {
  float* logits;
  float2* lse;
  float* grad_part;
  float* loss_part;  // [2, B * tiles]
  float* log_z;
  size_t bytes;
};

Workspace carve(char* base, int64_t batch, int64_t cols, int64_t max_dim) {
  const size_t blocks = static_cast<size_t>(batch * tiles_of(cols));
  size_t at = 0;
  Workspace ws{};
  auto take = [&](size_t bytes) {
    char* here = base == nullptr ? nullptr : base + at;
    at += align256(bytes);
    return here;
  };
  ws.logits = reinterpret_cast<float*>(take(sizeof(float) * static_cast<size_t>(batch * cols)));
  ws.lse = reinterpret_cast<float2*>(take(sizeof(float2) * blocks));
  ws.grad_part = reinterpret_cast<float*>(take(sizeof(float) * blocks * static_cast<size_t>(max_dim)));
  ws.loss_part = reinterpret_cast<float*>(take(sizeof(float) * 2 * blocks));
  ws.log_z = reinterpret_cast<float*>(take(sizeof(float)));
  ws.bytes = at;
  return ws;
}

// Smallest power of two >= n (n >= 1).
int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// Threads per bank row: enough that each loads about `target` chunks, a power of two <= 32.
// Fewer threads per row means fewer shuffles per dot product and more rows per warp
// instruction, so the per-column NCE arithmetic (done by every thread of the row's group)
// stays small against the loads.
int lanes_for(int64_t chunks, int target) {
  const int lanes = pow2_at_least((chunks + target - 1) / target);
  return lanes < 32 ? lanes : 32;
}

template <typename T, int VEC, int MAXC>
cudaError_t launch_pass(const PassParams& p, int loads, int pass, int64_t blocks, cudaStream_t stream) {
  if (loads == MAXC) {
    const size_t shared = sizeof(float) * kWarps * static_cast<size_t>(p.dim);
    nce_pass_kernel<T, VEC, MAXC><<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(p, pass);
    return cudaGetLastError();
  }
  // Instantiated up to the loads that kNceMaxDim needs with 32 threads per row.
  if constexpr (32 * VEC * MAXC < kNceMaxDim) {
    return launch_pass<T, VEC, 2 * MAXC>(p, loads, pass, blocks, stream);
  } else {
    return cudaErrorInvalidValue;
  }
}

// Both passes and the z and gradient kernels of one side, for a bank of element type T.
template <typename T>
cudaError_t run_side(PassParams p, const NceSide& side, const NceProblem& problem, float* loss_part,
                     const Workspace& ws, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vectorised = side.dim % kVec == 0 && reinterpret_cast<uintptr_t>(side.bank) % 16 == 0;
  const int vec = vectorised ? kVec : 1;
  p.chunks = static_cast<int>(side.dim / vec);
  // about 16 elements (fp32: 4 loads of 16 bytes, 16-bit: 2, unaligned rows: 16 scalars) per
  // thread and row; the kernel keeps several rows in flight when that is fewer than 4 loads
  p.lanes = lanes_for(p.chunks, vectorised ? 16 / kVec : 16);
  const int loads = pow2_at_least((p.chunks + p.lanes - 1) / p.lanes);
  p.dim = side.dim;
  p.anchor = side.anchor;
  p.anchor_dtype = side.anchor_dtype;
  p.bank = side.bank;
  p.log_z_in = side.log_z;
  p.log_z = ws.log_z;
  p.loss_part = loss_part;
  const int64_t blocks = problem.batch * p.tiles;
  const double log_scale = std::log(static_cast<double>(problem.num_data)) -
                           std::log(static_cast<double>(problem.batch) * static_cast<double>(problem.cols));
  for (int pass = 1; pass <= 2; ++pass) {
    const cudaError_t err = vectorised ? launch_pass<T, kVec, 1>(p, loads, pass, blocks, stream)
                                       : launch_pass<T, 1, 1>(p, loads, pass, blocks, stream);
    if (err != cudaSuccess) return err;
    if (pass == 1) {
      const bool moving = problem.z_momentum > 0.0 && problem.z_momentum < 1.0;  // m = 1 keeps Z
      z_kernel<<<1, kThreads, 0, stream>>>(ws.lse, blocks, log_scale, side.log_z, side.log_z_new, ws.log_z,
                                           moving, moving ? std::log(problem.z_momentum) : 0.0,
                                           moving ? std::log1p(-problem.z_momentum) : 0.0);
      const cudaError_t z_err = cudaGetLastError();
      if (z_err != cudaSuccess) return z_err;
    }
  }
  const int threads = side.dim >= kThreads ? kThreads : static_cast<int>((side.dim + 31) / 32 * 32);
  grad_finalize_kernel<<<static_cast<unsigned>(problem.batch), threads, 0, stream>>>(
      ws.grad_part, p.tiles, side.dim, side.grad, side.anchor_dtype);
  return cudaGetLastError();
}

cudaError_t run_side_any(const PassParams& p, const NceSide& side, const NceProblem& problem, float* loss_part,
                         const Workspace& ws, cudaStream_t stream) {
  switch (side.bank_dtype) {
    case DType::kFloat32: return run_side<float>(p, side, problem, loss_part, ws, stream);
    case DType::kFloat16: return run_side<__half>(p, side, problem, loss_part, ws, stream);
    case DType::kBFloat16: return run_side<__nv_bfloat16>(p, side, problem, loss_part, ws, stream);
  }
  return cudaErrorInvalidValue;
}

bool valid_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

bool valid_side(const NceSide& side) {
  return side.anchor != nullptr && side.bank != nullptr && side.log_z != nullptr && side.log_z_new != nullptr &&
         side.grad != nullptr && side.log_z_new != side.log_z && side.dim >= 1 && side.dim <= kNceMaxDim &&
         valid_dtype(side.anchor_dtype) && valid_dtype(side.bank_dtype);
}

template <typename BankT, typename ValueT>
void launch_bank_update(void* bank, int64_t num_rows, int64_t dim, const int64_t* index, int64_t count,
                        const void* value, float keep, float mix, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((count + kWarps - 1) / kWarps);
  bank_update_kernel<BankT, ValueT><<<blocks, kThreads, 0, stream>>>(
      static_cast<typename Elem<BankT>::Bits*>(bank), num_rows, dim, index, count,
      static_cast<const typename Elem<ValueT>::Bits*>(value), keep, mix);
}

template <typename BankT>
void launch_bank_update_value(void* bank, int64_t num_rows, int64_t dim, const int64_t* index, int64_t count,
                              const void* value, DType value_dtype, float keep, float mix, cudaStream_t stream) {
  switch (value_dtype) {
    case DType::kFloat32:
      launch_bank_update<BankT, float>(bank, num_rows, dim, index, count, value, keep, mix, stream);
      break;
    case DType::kFloat16:
      launch_bank_update<BankT, __half>(bank, num_rows, dim, index, count, value, keep, mix, stream);
      break;
    case DType::kBFloat16:
      launch_bank_update<BankT, __nv_bfloat16>(bank, num_rows, dim, index, count, value, keep, mix, stream);
      break;
  }
}

}  // namespace

size_t nce_workspace_bytes(int64_t batch, int64_t cols, int64_t max_dim) {
  return carve(nullptr, batch, cols, max_dim).bytes;
}

cudaError_t nce_forward(const NceProblem& problem, const NceSide& student, const NceSide& teacher, float* loss,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const bool philox = problem.contrast_idx == nullptr;
  if (problem.batch < 1 || problem.cols < 2 || problem.num_data < 1 || problem.num_data > 0xFFFFFFFFll ||
      !(problem.temperature > 0.0) || loss == nullptr || workspace == nullptr ||
      reinterpret_cast<uintptr_t>(workspace) % 256 != 0 ||
      (philox && (problem.idx == nullptr || problem.rng_state == nullptr)) || !valid_side(student) ||
      !valid_side(teacher)) {
    return cudaErrorInvalidValue;
  }
  const int64_t tiles = tiles_of(problem.cols);
  if (problem.batch * tiles > 0x7FFFFFFFll || problem.batch > 0x7FFFFFFFll) return cudaErrorInvalidValue;
  const int64_t max_dim = student.dim > teacher.dim ? student.dim : teacher.dim;
  const Workspace ws = carve(static_cast<char*>(workspace), problem.batch, problem.cols, max_dim);
  if (workspace_bytes < ws.bytes) return cudaErrorInvalidValue;

  const double noise = static_cast<double>(problem.cols - 1) / static_cast<double>(problem.num_data);
  PassParams p{};
  p.batch = problem.batch;
  p.cols = problem.cols;
  p.num_data = problem.num_data;
  p.tiles = tiles;
  p.contrast_idx = problem.contrast_idx;
  p.idx = problem.idx;
  p.rng_state = problem.rng_state;
  p.shared_negatives = problem.shared_negatives;
  p.temperature = static_cast<float>(problem.temperature);
  p.log_c = static_cast<float>(std::log(noise + kNceEps));
  p.kappa = static_cast<float>(std::log1p(kNceEps / noise));
  p.d_scale = static_cast<float>(-1.0 / (static_cast<double>(problem.batch) * problem.temperature));
  p.logits = ws.logits;
  p.lse = ws.lse;
  p.grad_part = ws.grad_part;

  const int64_t blocks = problem.batch * tiles;
  cudaError_t err = run_side_any(p, student, problem, ws.loss_part, ws, stream);
  if (err != cudaSuccess) return err;
  err = run_side_any(p, teacher, problem, ws.loss_part + blocks, ws, stream);
  if (err != cudaSuccess) return err;
  loss_kernel<<<1, kThreads, 0, stream>>>(ws.loss_part, blocks, 1.0 / static_cast<double>(problem.batch), loss);
  return cudaGetLastError();
}

cudaError_t bank_update(void* bank, DType bank_dtype, int64_t num_rows, int64_t dim, const int64_t* index,
                        int64_t count, const void* value, DType value_dtype, double momentum, cudaStream_t stream) {
  if (count < 0 || num_rows < 0 || dim < 1 || !valid_dtype(bank_dtype) || !valid_dtype(value_dtype) ||
      (count > 0 && (bank == nullptr || index == nullptr || value == nullptr)) ||
      (count + kWarps - 1) / kWarps > 0x7FFFFFFFll) {
    return cudaErrorInvalidValue;
  }
  if (count == 0 || num_rows == 0) return cudaSuccess;
  const auto keep = static_cast<float>(momentum), mix = static_cast<float>(1.0 - momentum);
  switch (bank_dtype) {
    case DType::kFloat32:
      launch_bank_update_value<float>(bank, num_rows, dim, index, count, value, value_dtype, keep, mix, stream);
      break;
    case DType::kFloat16:
      launch_bank_update_value<__half>(bank, num_rows, dim, index, count, value, value_dtype, keep, mix, stream);
      break;
    case DType::kBFloat16:
      launch_bank_update_value<__nv_bfloat16>(bank, num_rows, dim, index, count, value, value_dtype, keep, mix,
                                              stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace fastkd::cuda

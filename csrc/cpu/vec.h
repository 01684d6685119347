// Vector arithmetic for the CPU kernels: 32-byte packs (GCC / Clang vector extensions) with branch-free
// polynomial exp and log, and a dispatch that compiles a kernel twice, for AVX2 + FMA and for the baseline
// ISA, and runs the AVX2 one where the CPU has it.
//
// (ATen's at::vec vectorises its exponential only inside ATen's own per-ISA builds: an extension compiled
// once, without -mavx2, gets the scalar fallback, std::exp per lane. Kernels here are written against these
// packs inside a struct with a static ``run`` and called through run_vectorized<Kernel>(...), so that
// everything they inline is compiled for the dispatched ISA.)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define FASTKD_INLINE inline __attribute__((always_inline))

namespace fastkd::cpu::vec {

// One AVX register of fp32 or fp64 lanes (two SSE registers on the baseline ISA).
template <typename T>
struct Pack;
template <>
struct Pack<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t bits __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Pack<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int width = 4;
};
template <typename T>
using pack = typename Pack<T>::type;
template <typename T>
constexpr int kWidth = Pack<T>::width;

template <typename T>
FASTKD_INLINE pack<T> splat(T x) {
  return pack<T>{} + x;
}

// ``count`` (≤ width) values from p; the other lanes hold ``pad``.
template <typename T>
FASTKD_INLINE pack<T> load(const T* p, int64_t count, T pad) {
  pack<T> v = splat(pad);
  std::memcpy(&v, p, sizeof(T) * count);
  return v;
}

template <typename T>
FASTKD_INLINE void store(T* p, pack<T> v, int64_t count) {
  std::memcpy(p, &v, sizeof(T) * count);
}

template <typename T>
FASTKD_INLINE T lane_sum(pack<T> v) {
  T total = 0;
  for (int j = 0; j < kWidth<T>; ++j) total += v[j];
  return total;
}

// body(c, count) for the packs of a row of n: full packs, then one partial pack.
template <typename T, typename Body>
FASTKD_INLINE void for_packs(int64_t n, Body&& body) {
  int64_t c = 0;
  for (; c + kWidth<T> <= n; c += kWidth<T>) body(c, kWidth<T>);
  if (c < n) body(c, n - c);
}

// exp(x) in fp32 for x ≤ 88: x = n·ln2 + r with |r| ≤ ln2/2, exp(r) by its degree-7 Taylor polynomial
// (truncation < 1e-8 relative on that interval; measured max relative error 1.7e-7 over [−87, 88]), evaluated
// by Estrin's scheme (a shorter dependency chain than Horner's: 13% faster on the build machine's Zen 2);
// 2^n added into the exponent bits (n sits in the low mantissa bits of the rounding sum); 0 below −87.3
// (no subnormals).
FASTKD_INLINE pack<float> exp_pack(pack<float> x) {
  typedef Pack<float>::bits bits_t;
  const pack<float> lowest = splat(-87.3f);
  const pack<float> xc = x < lowest ? lowest : x;
  const pack<float> rounded = xc * 1.44269504088896341f + 12582912.0f;  // 1.5·2^23 + round(x·log2 e)
  const pack<float> n = rounded - 12582912.0f;
  const pack<float> r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  const pack<float> r2 = r * r, r4 = r2 * r2;
  const pack<float> p01 = r + 1.0f, p23 = r * (1.0f / 6.0f) + 0.5f;
  const pack<float> p45 = r * (1.0f / 120.0f) + 1.0f / 24.0f, p67 = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  const pack<float> p = (p01 + r2 * p23) + r4 * (p45 + r2 * p67);
  const bits_t scaled = reinterpret_cast<const bits_t&>(p) + (reinterpret_cast<const bits_t&>(rounded) << 23);
  return x < lowest ? splat(0.0f) : reinterpret_cast<const pack<float>&>(scaled);
}

FASTKD_INLINE pack<double> exp_pack(pack<double> x) {
  for (int j = 0; j < kWidth<double>; ++j) x[j] = std::exp(x[j]);
  return x;
}

// log(x) in fp32 for positive normal x: x = m·2^e with m in [√½, √2), log m = 2·atanh(s), s = (m − 1)/(m + 1),
// |s| ≤ 0.1716, by its odd series to s⁹ (truncation < 1e-9 relative); e·ln2 in two parts. Lanes that are not
// positive normal numbers (0, subnormal, negative, inf, NaN) take std::log, so the result is always log's.
FASTKD_INLINE pack<float> log_pack(pack<float> x) {
  typedef Pack<float>::bits bits_t;
  const bits_t ix = reinterpret_cast<const bits_t&>(x);
  const bits_t normal = (ix >= 0x00800000) & (ix < 0x7f800000);  // positive, normal, finite (all ones = yes)
  // mantissa in [1, 2), then halved (and the exponent raised) where it is ≥ √2
  bits_t e = (ix >> 23) - 127;
  const bits_t mant_bits = (ix & 0x007fffff) | 0x3f800000;
  pack<float> m = reinterpret_cast<const pack<float>&>(mant_bits);
  const bits_t big = m >= 1.41421356237f;
  m = big ? m * 0.5f : m;
  e = e - big;  // big is −1 where true
  const pack<float> s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  pack<float> p = splat(2.0f / 9.0f);
  p = p * s2 + 2.0f / 7.0f;
  p = p * s2 + 2.0f / 5.0f;
  p = p * s2 + 2.0f / 3.0f;
  p = p * s2 + 2.0f;
  const pack<float> ef = __builtin_convertvector(e, pack<float>);
  pack<float> out = (ef * 0.693145751953125f + p * s) + ef * 1.42860682030941723212e-6f;
  bool all_normal = true;
  for (int j = 0; j < kWidth<float>; ++j) all_normal &= normal[j] != 0;
  if (__builtin_expect(!all_normal, 0)) {
    for (int j = 0; j < kWidth<float>; ++j)
      if (!normal[j]) out[j] = std::log(x[j]);
  }
  return out;
}

FASTKD_INLINE pack<double> log_pack(pack<double> x) {
  for (int j = 0; j < kWidth<double>; ++j) x[j] = std::log(x[j]);
  return x;
}

// Kernel::run(args...) compiled for AVX2 + FMA, and for the baseline ISA.
template <typename Kernel, typename... Args>
__attribute__((target("avx2,fma"))) void run_avx2(Args... args) {
  Kernel::run(args...);
}

template <typename Kernel, typename... Args>
void run_baseline(Args... args) {
  Kernel::run(args...);
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// Kernel::run(args...) on the best ISA of this CPU.
template <typename Kernel, typename... Args>
void run_vectorized(Args... args) {
  if (has_avx2())
    run_avx2<Kernel>(args...);
  else
    run_baseline<Kernel>(args...);
}

}  // namespace fastkd::cpu::vec

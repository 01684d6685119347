// Philox4x32-10 (Salmon et al., SC 2011) for CRD's negative sampling on the CPU.
// The contract (key, counter layout, index mapping) is written down in fastkd/ops/philox.py;
// the Triton and CUDA kernels implement the same function.
#pragma once
#include <cstdint>

namespace fastkd::cpu {

inline uint32_t philox_word0(uint64_t seed, uint64_t offset, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = uint64_t{0xCD9E8D57u} * c2;
    const uint64_t prod_a = uint64_t{0xD2511F53u} * c0;
    const uint32_t next0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// A row index uniform over [0, n) from one Philox word.
inline int64_t philox_index(uint32_t word, int64_t n) {
  return static_cast<int64_t>((static_cast<uint64_t>(word) * static_cast<uint64_t>(n)) >> 32);
}

}  // namespace fastkd::cpu

// Gram matrix G = X X^T of a [n, K] batch on CPU, for the batch-relation ops (similarity.cpp).
//
// G is symmetric, so only the entries on and above the diagonal are computed (a syrk: half the
// multiply-adds of the GEMM at::mm(X, X^T)) and mirrored. The shape these ops see is a short, wide
// X (n = a batch, up to a few hundred; K = C·H·W, up to ~100k), so each entry is a dot product of
// two long rows: a register tile of kRowsA x kRowsB rows keeps kRowsA·kRowsB accumulators of 8
// lanes in ymm registers and walks K in 8-wide packs (7 loads for 12 FMAs). K is cut into blocks
// small enough that the whole [n, block] panel stays in a core's L2; within a block consecutive
// tiles share their kRowsA rows, which stay in L1.
//
// Threads take contiguous runs of tiles (at::parallel_for; the tiles of one row block are
// neighbours, so every run holds about the same number of multiply-adds whatever the triangle's
// shape), and each entry is summed by one thread in a fixed order: the result does not depend on
// the thread count. Accuracy: each lane sums one K block (≤ kc/8 terms) from zero, the blocks are
// added in fp32 lane by lane, and the 8 lanes by a fixed tree, so rounding grows with kc/8 + K/kc
// rather than with K as in a plain running sum.
//
// The kernel needs AVX2 + FMA (checked at run time: the extension is compiled once, for the
// baseline ISA; in SSE's 16 xmm registers the tile spills and MKL's own SSE path is faster), fp32
// and a K where the GEMM's fixed cost does not already win; everything else goes to at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

#define FASTKD_INLINE inline __attribute__((always_inline))

namespace fastkd::cpu {
namespace {

typedef float pack8 __attribute__((vector_size(32)));  // one ymm register of fp32 lanes

constexpr int kRowsA = 3;  // rows of a tile kept in registers through the inner loop (and in L1 across tiles)
constexpr int kRowsB = 4;  // rows streamed against them: 12 accumulators + 3 row packs + 1 = 16 ymm
constexpr int kLanes = 8;
constexpr int64_t kPanelFloats = 64 * 1024;  // [n, kc] panel of a K block: 256 KB, half a Zen core's L2
constexpr int64_t kMinBlock = 256;           // K block floor (large n): keeps the per-block tile overhead small
constexpr int64_t kThreadFmas = 1 << 20;     // multiply-adds a thread should get at least (~25 µs)

// Where at::mm stays: n = 1 (nothing to halve), n above kMaxRows (the GEMM's packed panels reuse data
// better than row-pair dot products once the panel no longer fits in L2), K below kMinDepth (the
// fixed cost of the tiles and of the final reduction against a ~16 µs GEMM). Measured crossover in
// the commit that introduced this file.
constexpr int64_t kMaxRows = 256;
constexpr int64_t kMinDepth = 64;

FASTKD_INLINE pack8 load_pack(const float* p) {
  pack8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// ``count`` < 8 values from p, zeros in the other lanes.
FASTKD_INLINE pack8 load_partial(const float* p, int64_t count) {
  pack8 v = pack8{};
  std::memcpy(&v, p, sizeof(float) * count);
  return v;
}

// acc[(i * kRowsB + j) * 8 + lane] += lane sums of a[i][k] * b[j][k] over k in [k0, k1); packs up to ``full`` are
// whole, the rest (< 8 values, the end of X's rows) is zero-padded.
struct Tile {
  static FASTKD_INLINE void run(const float* const* a, const float* const* b, int64_t k0, int64_t k1, int64_t full,
                                float* acc) {
    pack8 sum[kRowsA][kRowsB];
    for (int i = 0; i < kRowsA; ++i)
      for (int j = 0; j < kRowsB; ++j) sum[i][j] = pack8{};
    const int64_t whole_end = std::min(k1, full);
    int64_t k = k0;
    for (; k < whole_end; k += kLanes) {
      pack8 va[kRowsA];
      for (int i = 0; i < kRowsA; ++i) va[i] = load_pack(a[i] + k);
      for (int j = 0; j < kRowsB; ++j) {
        const pack8 vb = load_pack(b[j] + k);
        for (int i = 0; i < kRowsA; ++i) sum[i][j] += va[i] * vb;
      }
    }
    if (k < k1) {
      pack8 va[kRowsA];
      for (int i = 0; i < kRowsA; ++i) va[i] = load_partial(a[i] + k, k1 - k);
      for (int j = 0; j < kRowsB; ++j) {
        const pack8 vb = load_partial(b[j] + k, k1 - k);
        for (int i = 0; i < kRowsA; ++i) sum[i][j] += va[i] * vb;
      }
    }
    for (int i = 0; i < kRowsA; ++i) {
      for (int j = 0; j < kRowsB; ++j) {
        float* dst = acc + (i * kRowsB + j) * kLanes;
        const pack8 total = load_pack(dst) + sum[i][j];
        std::memcpy(dst, &total, sizeof(total));
      }
    }
  }
};

__attribute__((target("avx2,fma"))) void tile_avx2(const float* const* a, const float* const* b, int64_t k0,
                                                   int64_t k1, int64_t full, float* acc) {
  Tile::run(a, b, k0, k1, full, acc);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// A tile: rows [row_a, row_a + kRowsA) against rows [row_b, row_b + kRowsB).
struct TileIndex {
  int32_t row_a, row_b;
};

// The tiles that hold an entry on or above the diagonal (row_b + kRowsB - 1 >= row_a), row block by
// row block, so that neighbours share their A rows.
std::vector<TileIndex> upper_tiles(int64_t n) {
  std::vector<TileIndex> tiles;
  for (int64_t a = 0; a < n; a += kRowsA) {
    for (int64_t b = (a / kRowsB) * kRowsB; b < n; b += kRowsB)
      tiles.push_back({static_cast<int32_t>(a), static_cast<int32_t>(b)});
  }
  return tiles;
}

// The 8 lanes of one entry, by a fixed tree.
float lane_sum(const float* v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

at::Tensor gram_upper_fp32(const at::Tensor& x) {
  const int64_t n = x.size(0), depth = x.size(1);
  const float* data = x.data_ptr<float>();
  at::Tensor g = at::empty({n, n}, x.options());
  float* out = g.data_ptr<float>();
  const std::vector<TileIndex> tiles = upper_tiles(n);
  const int64_t count = static_cast<int64_t>(tiles.size());
  // K blocks: multiples of 8 (only the last block of a row ends in a partial pack)
  const int64_t block = std::max(kMinBlock, kPanelFloats / n / kLanes * kLanes);
  const int64_t full = depth - depth % kLanes;
  const int64_t tile_fmas = kRowsA * kRowsB * depth;
  const int64_t grain = std::max<int64_t>(1, (kThreadFmas + tile_fmas - 1) / tile_fmas);
  // rows past n (the last tiles' padding) read row n - 1; their sums are dropped
  auto row = [&](int64_t r) { return data + std::min(r, n - 1) * depth; };
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    // lane sums of this thread's tiles (plain floats: std::vector does not keep a vector type's alignment)
    constexpr int64_t kTileFloats = kRowsA * kRowsB * kLanes;
    std::vector<float> acc(static_cast<size_t>((end - begin) * kTileFloats), 0.0f);
    for (int64_t k0 = 0; k0 < depth; k0 += block) {
      const int64_t k1 = std::min(depth, k0 + block);
      for (int64_t t = begin; t < end; ++t) {
        const float* a[kRowsA];
        const float* b[kRowsB];
        for (int i = 0; i < kRowsA; ++i) a[i] = row(tiles[t].row_a + i);
        for (int j = 0; j < kRowsB; ++j) b[j] = row(tiles[t].row_b + j);
        tile_avx2(a, b, k0, k1, full, acc.data() + (t - begin) * kTileFloats);
      }
    }
    // each entry (r, c) with c >= r belongs to exactly one tile: written there with its mirror
    for (int64_t t = begin; t < end; ++t) {
      const float* sums = acc.data() + (t - begin) * kTileFloats;
      for (int i = 0; i < kRowsA; ++i) {
        for (int j = 0; j < kRowsB; ++j) {
          const int64_t r = tiles[t].row_a + i, c = tiles[t].row_b + j;
          if (r >= n || c >= n || c < r) continue;
          const float s = lane_sum(sums + (i * kRowsB + j) * kLanes);
          out[r * n + c] = s;
          out[c * n + r] = s;
        }
      }
    }
  });
  return g;
}

}  // namespace

at::Tensor gram_matrix(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "gram_matrix: expected a [n, K] matrix, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gram_matrix: expected fp32 or fp64, got ", x.scalar_type());
  const at::Tensor q = as_contiguous(x);
  const int64_t n = q.size(0), depth = q.size(1);
  if (q.scalar_type() == at::kFloat && n > 1 && n <= kMaxRows && depth >= kMinDepth && has_avx2())
    return gram_upper_fp32(q);
  return at::mm(q, q.t());
}

}  // namespace fastkd::cpu

// Gram matrix G = X X^T of a [n, K] batch on CPU, for the batch-relation ops (similarity.cpp).
//
// G is symmetric, so only the entries on and above the diagonal are computed (a syrk: half the
// multiply-adds of the GEMM at::mm(X, X^T)) and mirrored. The shape these ops see is a short, wide
// X (n = a batch, up to a few hundred; K = C·H·W, up to ~100k), so each entry is a dot product of
// two long rows: a register tile of kRowsA x kRowsB rows keeps kRowsA·kRowsB accumulators of 8
// lanes in ymm registers and walks K in 8-wide packs (7 loads for 12 FMAs). K is cut into blocks
// small enough that the [n, block] panel stays in a core's L2 (each thread copies it there, see
// gram_upper_fp32); within a block consecutive tiles share their kRowsA rows, which stay in L1.
// At n = 64, K = 16384 on one Zen 3 core this takes ~1.05 ms against ~1.75 ms for at::mm.
//
// Threads take contiguous runs of tiles (at::parallel_for; the tiles of one row block are
// neighbours, so every run holds about the same number of multiply-adds whatever the triangle's
// shape), and each entry is summed by one thread in a fixed order: the result does not depend on
// the thread count. (at::parallel_for is inlined into this file and uses threads only where it is
// compiled with -fopenmp; so built, n = 64, K = 16384 takes 0.64 ms on 2 threads against 1.0 ms for
// at::mm.)
//
// Accuracy: each lane sums one K block (≤ block/8 terms) from zero, the 8 lanes are added by a fixed
// tree and the blocks' sums added into G in fp32, so rounding grows with block/8 + K/block rather
// than with K as in one running sum (at K = 100k: max error / max |G| of ~4e-7 against ~1e-6 for
// at::mm).
//
// The kernel needs AVX2 + FMA (checked at run time: the extension is compiled once, for the
// baseline ISA; in SSE's 16 xmm registers the tile would spill, and MKL has its own SSE path), fp32,
// rows with unit stride, and a shape where it wins; everything else goes to at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace fastkd::cpu {
namespace {

typedef vec::pack<float> pack8;  // one ymm register of fp32 lanes
typedef float pack4 __attribute__((vector_size(16)));

constexpr int kRowsA = 3;  // rows of a tile kept in registers through the inner loop (and in L1 across tiles)
constexpr int kRowsB = 4;  // rows streamed against them: 12 accumulators + 3 row packs + 1 = 16 ymm
constexpr int kLanes = 8;
// [n, block] panel of a K block: 128 KB, a quarter of a Zen core's L2, which also holds the next block's
// rows while they are prefetched (n = 64: block = 512)
constexpr int64_t kPanelFloats = 32 * 1024;
constexpr int64_t kMinBlock = 512;           // K block floor (large n): keeps the per-block tile overhead small
constexpr int64_t kThreadFmas = 1 << 20;     // multiply-adds a thread should get at least (~25 µs)

// Where the kernel runs (one Zen 3 core, time of at::mm / time of the kernel): K >= kMinDepth (n = 64:
// 1.0 at K = 128, 1.2 at 256, 1.7 at 4096; n = 256: 0.9 at 128, 1.1 at 256, 1.5 at 16384), or n <= kSmallRows
// at any K (n = 16: 1.4 from K = 16 up; n = 32: 1.0 at K = 16, 1.2 at 128), and n <= kMaxRows (1.3 at
// n = 512, K = 4096; larger n not measured). Below K = kMinDepth the tiles' fixed cost (lane
// reductions, the panel copy) outweighs the halved multiply-adds; n = 1 has nothing to halve.
constexpr int64_t kMinDepth = 256;
constexpr int64_t kSmallRows = 32;
constexpr int64_t kMaxRows = 512;
// relation_product's kernel runs from K = kProductMinDepth (measured, build machine, Y = M X alone: n = 64,
// K = 16,384: 1.76 ms against MKL's 2.22 on one thread, 0.95 against 1.58 on two; n = 256, K = 16,384: 24 vs
// 38 ms; n = 512, K = 4,096: 23 vs 31 ms). Below it a thread's column block holds all of K and MKL, which splits
// the rows too, is as fast on one thread and faster on two (n = 256, K = 128).
constexpr int64_t kProductMinDepth = 1024;

FASTKD_INLINE pack8 load_pack(const float* p) {
  pack8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Lane-pair sums of a and b, in vhaddps's order: [a01 a23 b01 b23 | a45 a67 b45 b67].
FASTKD_INLINE pack8 pair_sums(pack8 a, pack8 b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The 8 lanes of v0..v3 each summed by one tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)):
// 5 shuffle-adds for 4 entries instead of a scalar tree per entry.
FASTKD_INLINE pack4 lane_sums(pack8 v0, pack8 v1, pack8 v2, pack8 v3) {
  const pack8 quads = pair_sums(pair_sums(v0, v1), pair_sums(v2, v3));  // [low halves of v0..v3 | high halves]
  return __builtin_shufflevector(quads, quads, 0, 1, 2, 3) + __builtin_shufflevector(quads, quads, 4, 5, 6, 7);
}

// sums[i * kRowsB + j] = sum over k < 8 * packs of a[i][k] * b[j][k]: 8 lanes in registers, then the
// lanes of each entry by a fixed tree.
struct Tile {
  static_assert(kRowsB == 4, "the lane reduction takes 4 accumulators at a time");

  static FASTKD_INLINE void run(const float* const* a, const float* const* b, int64_t packs, float* sums) {
    pack8 acc[kRowsA][kRowsB];
    for (int i = 0; i < kRowsA; ++i)
      for (int j = 0; j < kRowsB; ++j) acc[i][j] = pack8{};
    for (int64_t k = 0; k < packs * kLanes; k += kLanes) {
      pack8 va[kRowsA];
      for (int i = 0; i < kRowsA; ++i) va[i] = load_pack(a[i] + k);
      for (int j = 0; j < kRowsB; ++j) {
        const pack8 vb = load_pack(b[j] + k);
        for (int i = 0; i < kRowsA; ++i) acc[i][j] += va[i] * vb;
      }
    }
    for (int i = 0; i < kRowsA; ++i) {
      const pack4 row = lane_sums(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      std::memcpy(sums + i * kRowsB, &row, sizeof(row));
    }
  }
};


// A tile: rows [row_a, row_a + kRowsA) against rows [row_b, row_b + kRowsB).
struct TileIndex {
  int32_t row_a, row_b;
};

// The tiles that hold an entry on or above the diagonal (row_b + kRowsB - 1 >= row_a), row block by
// row block, so that neighbours share their A rows. The first tile of a row block starts at
// floor(row_a / kRowsB) * kRowsB: no tile reads a row below that.
std::vector<TileIndex> upper_tiles(int64_t n) {
  std::vector<TileIndex> tiles;
  for (int64_t a = 0; a < n; a += kRowsA) {
    for (int64_t b = (a / kRowsB) * kRowsB; b < n; b += kRowsB)
      tiles.push_back({static_cast<int32_t>(a), static_cast<int32_t>(b)});
  }
  return tiles;
}

// Calls body(r, c, index) for the entries of a tile with c >= r inside [n, n]; index into its sums.
template <typename Body>
FASTKD_INLINE void for_upper_entries(const TileIndex& tile, int64_t n, Body&& body) {
  for (int i = 0; i < kRowsA; ++i) {
    const int64_t r = tile.row_a + i;
    if (r >= n) break;
    for (int j = 0; j < kRowsB; ++j) {
      const int64_t c = tile.row_b + j;
      if (c >= r && c < n) body(r, c, i * kRowsB + j);
    }
  }
}

at::Tensor gram_upper_fp32(const at::Tensor& x) {
  const int64_t n = x.size(0), depth = x.size(1), row_stride = x.stride(0);
  const float* data = x.data_ptr<float>();
  at::Tensor g = at::zeros({n, n}, x.options());
  float* out = g.data_ptr<float>();
  const std::vector<TileIndex> tiles = upper_tiles(n);
  const int64_t count = static_cast<int64_t>(tiles.size());
  // K blocks: multiples of 8, no longer than X's rows rounded up to a whole pack; packed rows 64 bytes more
  const int64_t block = std::min(std::max(kMinBlock, kPanelFloats / n / kLanes * kLanes),
                                 (depth + kLanes - 1) / kLanes * kLanes);
  const int64_t stride = block + 16;
  const int64_t tile_fmas = kRowsA * kRowsB * depth;
  const int64_t grain = std::max<int64_t>(1, (kThreadFmas + tile_fmas - 1) / tile_fmas);
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    // Each thread copies the K block of the rows it reads, [low, n), into a panel whose rows are a block
    // plus 64 bytes apart: X's own rows, often a multiple of 4 KB apart, would share cache sets and
    // evict each other (and the copy pads the last block to whole packs with zeros).
    const int64_t low = (tiles[begin].row_a / kRowsB) * kRowsB;
    std::vector<float> panel(static_cast<size_t>((n - low) * stride));
    // rows past n (the last tiles' padding) read row n - 1; their sums are dropped
    auto row = [&](int64_t r) { return panel.data() + (std::min(r, n - 1) - low) * stride; };
    float sums[kRowsA * kRowsB];
    for (int64_t k0 = 0; k0 < depth; k0 += block) {
      const int64_t len = std::min(block, depth - k0), packs = (len + kLanes - 1) / kLanes;
      for (int64_t r = low; r < n; ++r) {
        float* dst = panel.data() + (r - low) * stride;
        std::memcpy(dst, data + r * row_stride + k0, sizeof(float) * len);
        std::fill(dst + len, dst + packs * kLanes, 0.0f);
      }
      // The next block's rows, a few cache lines per tile, so that its copy reads from cache rather than
      // memory (X cold in L3, n = 64, K = 16384: 1.15 ms instead of 1.31 ms; warm: 1.07 instead of 1.0).
      const int64_t next = k0 + block, next_len = std::min(block, depth - next);
      const int64_t row_lines = next_len > 0 ? (next_len * 4 + 63) / 64 : 0;
      const int64_t per_tile = ((n - low) * row_lines + (end - begin) - 1) / (end - begin);
      int64_t fetch_row = low, fetch_line = 0;
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t p = 0; p < per_tile && fetch_row < n; ++p) {
          const char* line = reinterpret_cast<const char*>(data + fetch_row * row_stride + next) + 64 * fetch_line;
          __builtin_prefetch(line, 0, 1);
          if (++fetch_line == row_lines) {
            fetch_line = 0;
            ++fetch_row;
          }
        }
        const float* a[kRowsA];
        const float* b[kRowsB];
        for (int i = 0; i < kRowsA; ++i) a[i] = row(tiles[t].row_a + i);
        for (int j = 0; j < kRowsB; ++j) b[j] = row(tiles[t].row_b + j);
        vec::run_avx2<Tile>(a, b, packs, sums);
        // each entry (r, c) with c >= r belongs to exactly one tile
        for_upper_entries(tiles[t], n, [&](int64_t r, int64_t c, int index) { out[r * n + c] += sums[index]; });
      }
    }
    for (int64_t t = begin; t < end; ++t)
      for_upper_entries(tiles[t], n, [&](int64_t r, int64_t c, int) { out[c * n + r] = out[r * n + c]; });
  });
  return g;
}

// ---- M X: the backward product of the relation ops ----------------------------------------------------
//
// Y = M X for a small square M ([n, n], n = a batch) and a wide X ([n, K]): the transpose of the Gram's
// shape, and one where MKL's GEMM reaches about 60% of the FMA units' peak at n = 64, K = 16,384. Here each
// thread takes blocks of kPanelCols columns: it copies the block's [n, kPanelCols] panel of X in sub-blocks of
// kProductCols columns (see ProductBlocks), then for each tile of kProductRows output rows and kProductCols
// columns keeps kProductRows x 2 accumulators of 8 lanes in ymm registers while k runs over n: per k, 2 loads
// of the panel, kProductRows broadcasts of M (from a copy of M laid out tile by tile, so that they are
// adjacent) and 2·kProductRows FMAs. Each output entry is one running sum over k in order, as in a plain GEMM.
constexpr int kProductRows = 6;   // 12 accumulators + 2 panel packs + 1 broadcast = 15 ymm registers
constexpr int64_t kProductCols = 2 * kLanes;
constexpr int64_t kPanelCols = 16 * kProductCols;  // a thread's block of columns: a [64, 256] panel is 64 KB

// rows [0, rows) of a tile: out[i][0, 16) = sum_k m[k * kProductRows + i] * panel[k][0, 16)
template <int kRows>
struct ProductTile {
  static FASTKD_INLINE void run(const float* m, const float* panel, int64_t n, float* out, int64_t out_stride,
                                int64_t cols) {
    pack8 acc[kRows][2];
    for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = pack8{};
    for (int64_t k = 0; k < n; ++k) {
      const pack8 x0 = load_pack(panel + k * kProductCols), x1 = load_pack(panel + k * kProductCols + kLanes);
      for (int i = 0; i < kRows; ++i) {
        // a broadcast written out here: vec::splat's ``{} + x`` would cost an addition per FMA pair, and a lane
        // initialiser in a function of its own comes out as two 16-byte halves
        const float v = m[k * kProductRows + i];
        const pack8 mi = {v, v, v, v, v, v, v, v};
        acc[i][0] += mi * x0;
        acc[i][1] += mi * x1;
      }
    }
    for (int i = 0; i < kRows; ++i) {
      if (cols == kProductCols) {
        std::memcpy(out + i * out_stride, &acc[i][0], sizeof(pack8));
        std::memcpy(out + i * out_stride + kLanes, &acc[i][1], sizeof(pack8));
      } else {
        float row[kProductCols];
        std::memcpy(row, &acc[i][0], sizeof(pack8));
        std::memcpy(row + kLanes, &acc[i][1], sizeof(pack8));
        std::memcpy(out + i * out_stride, row, sizeof(float) * cols);
      }
    }
  }
};

// The column blocks [begin, end) of Y (kPanelCols columns each), on the AVX2 + FMA target. A block's panel of X
// is copied sub-block by sub-block: panel[sub][k][0, kProductCols), so that the k loop of a tile reads 64
// contiguous bytes per k (X's rows, and a panel's with whole rows, would be a multiple of 1 KB apart).
struct ProductBlocks {
  static FASTKD_INLINE void run(const float* tiles_m, const float* x, int64_t x_stride, int64_t n, int64_t depth,
                                float* y, int64_t begin, int64_t end) {
    constexpr int64_t subs = kPanelCols / kProductCols;
    std::vector<float> panel(static_cast<size_t>(subs * n * kProductCols));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kPanelCols, width = std::min(kPanelCols, depth - c0);
      const int64_t used = (width + kProductCols - 1) / kProductCols;
      for (int64_t k = 0; k < n; ++k) {
        const float* src = x + k * x_stride + c0;
        for (int64_t sub = 0; sub < used; ++sub) {
          float* dst = panel.data() + (sub * n + k) * kProductCols;
          const int64_t cols = std::min(kProductCols, width - sub * kProductCols);
          std::memcpy(dst, src + sub * kProductCols, sizeof(float) * cols);
          if (cols < kProductCols) std::fill(dst + cols, dst + kProductCols, 0.0f);
        }
      }
      for (int64_t r0 = 0; r0 < n; r0 += kProductRows) {
        const float* m = tiles_m + r0 * n;  // the tile's M entries, k-major: m[k * kProductRows + i]
        const int64_t rows = std::min<int64_t>(kProductRows, n - r0);
        for (int64_t sub = 0; sub < used; ++sub) {
          const float* p = panel.data() + sub * n * kProductCols;
          float* out = y + r0 * depth + c0 + sub * kProductCols;
          const int64_t cols = std::min(kProductCols, width - sub * kProductCols);
          switch (rows) {
            case 6: ProductTile<6>::run(m, p, n, out, depth, cols); break;
            case 5: ProductTile<5>::run(m, p, n, out, depth, cols); break;
            case 4: ProductTile<4>::run(m, p, n, out, depth, cols); break;
            case 3: ProductTile<3>::run(m, p, n, out, depth, cols); break;
            case 2: ProductTile<2>::run(m, p, n, out, depth, cols); break;
            default: ProductTile<1>::run(m, p, n, out, depth, cols); break;
          }
        }
      }
    }
  }
};

at::Tensor product_fp32(const at::Tensor& m_in, const at::Tensor& x) {
  const int64_t n = x.size(0), depth = x.size(1);
  const at::Tensor m = as_contiguous(m_in);
  const float* mp = m.data_ptr<float>();
  // M laid out tile by tile: for the rows [r0, r0 + kProductRows), entry (r0 + i, k) at r0 * n + k * kProductRows + i
  // (the last tile's missing rows are zeros and their outputs are not stored)
  std::vector<float> tiles_m(static_cast<size_t>((n + kProductRows) * n), 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t r0 = r / kProductRows * kProductRows;
    for (int64_t k = 0; k < n; ++k) tiles_m[r0 * n + k * kProductRows + (r - r0)] = mp[r * n + k];
  }
  at::Tensor y = at::empty({n, depth}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (depth + kPanelCols - 1) / kPanelCols;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    vec::run_avx2<ProductBlocks>(tiles_m.data(), xp, x.stride(0), n, depth, yp, begin, end);
  });
  return y;
}

}  // namespace

at::Tensor gram_matrix(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "gram_matrix: expected a [n, K] matrix, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gram_matrix: expected fp32 or fp64, got ", x.scalar_type());
  const int64_t n = x.size(0), depth = x.size(1);
  // the kernel copies X block by block, so any row stride will do as long as each row is contiguous
  const bool wins = n > 1 && n <= kMaxRows && depth > 0 && (depth >= kMinDepth || n <= kSmallRows);
  if (x.scalar_type() == at::kFloat && wins && x.stride(1) == 1 && vec::has_avx2())
    return gram_upper_fp32(x);
  const at::Tensor q = as_contiguous(x);
  return at::mm(q, q.t());
}

at::Tensor relation_product(const at::Tensor& m, const at::Tensor& x) {
  TORCH_CHECK(m.dim() == 2 && x.dim() == 2 && m.size(0) == m.size(1) && m.size(1) == x.size(0),
              "relation_product: expected [n, n] and [n, K], got ", m.sizes(), " and ", x.sizes());
  TORCH_CHECK(m.scalar_type() == x.scalar_type(), "relation_product: M and X must share a dtype");
  const int64_t n = x.size(0), depth = x.size(1);
  // real CPU tensors only (fake / functional ones, under torch.compile's tracing, take at::mm's fake kernel)
  const bool plain = !at::isTensorSubclassLike(m) && !at::isTensorSubclassLike(x) && m.is_cpu() && x.is_cpu();
  if (plain && x.scalar_type() == at::kFloat && n >= 1 && n <= kMaxRows && depth >= kProductMinDepth &&
      x.stride(1) == 1 && vec::has_avx2())
    return product_fp32(m, x);
  return at::mm(m, x);
}

}  // namespace fastkd::cpu

// CPU kernels of the CRD op family.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "ops.h"
#include "philox.h"

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

// ---------------------------------------------------------------------------------------------
// crd_nce: both NCE directions with the anchors' gradients, in log space: Z comes and goes as log Z
// (-inf: not estimated yet) and every term is a function of log P = s/T - log Z, so nothing
// overflows at any temperature (Z itself spans e^(+-1/T)).
//
// Two algorithms, chosen from the sizes (FASTKD_CRD_CPU_ALGO=dense|gather overrides):
//  * dense, when the bank is not larger than the number of draws: S = anchors @ bank^T ([B, N],
//    one GEMM per direction), the drawn entries are read from S (row b stays in cache while
//    anchor b is served), and the gradient is one more GEMM against S overwritten with
//    d loss / d s at the drawn entries (duplicates add up);
//  * gather, otherwise: each drawn row is read from the bank and dotted with its anchor; a second
//    gather accumulates the gradient rows.
// When Z is known (every step but the first) each anchor is served in one pass: its K+1 indices
// are drawn once, its logits gathered, its NCE terms and d loss / d s computed, and its gradient
// rows written while they are in cache. On the first step the logits of the whole batch are kept
// ([B, K+1] per side) until Z is estimated from them. No [B, K+1, D] tensor and no index tensor
// exists: indices come from Philox (or the caller's table) anchor by anchor.
namespace {

constexpr double kNceEps = 1e-7;

// softplus(x) = log(1 + e^x) and sigmoid(x) = 1 / (1 + e^-x) from one exponential, finite and
// accurate for every x (log1p of e^-|x| <= 1).
template <typename T>
inline void softplus_sigmoid(T x, T& softplus, T& sigmoid) {
  const T e = std::exp(-std::abs(x));
  softplus = std::max(x, T(0)) + std::log1p(e);
  sigmoid = x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

bool z_known(double log_z) { return log_z > -std::numeric_limits<double>::infinity(); }  // NaN: not known

// Where anchor b's K+1 bank rows come from: the caller's [B, K+1] table, or its positive + Philox.
struct ContrastRows {
  const int64_t* table = nullptr;
  const int64_t* positives = nullptr;
  uint64_t seed = 0, offset = 0;
  int64_t negatives = 0, num_data = 0;
  bool shared = false;

  void fill(int64_t b, int64_t* out) const {
    const int64_t cols = negatives + 1;
    if (table != nullptr) {
      std::copy(table + b * cols, table + (b + 1) * cols, out);
      return;
    }
    out[0] = positives[b];
    const uint64_t base = shared ? 0 : static_cast<uint64_t>(b) * static_cast<uint64_t>(negatives);
    for (int64_t k = 1; k < cols; ++k) out[k] = philox_index(philox_word0(seed, offset, base + k - 1), num_data);
  }
};

// One direction: anchors [B, D] (in the accumulation type) scored against a bank [N, D].
// ``bank`` may be a strided view (crd_nce_multi's [N, M, D] banks: pair m's rows are M * D apart).
struct Side {
  at::Tensor anchors, bank, logits, dense, grad;
  double log_estimate = 0, log_z = 0, loss = 0;
};

template <typename acc_t, typename bank_t>
acc_t dot_row(const bank_t* row, const acc_t* anchor, int64_t dim) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += static_cast<acc_t>(row[d + l]) * anchor[d + l];
  acc_t total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; d < dim; ++d) total += static_cast<acc_t>(row[d]) * anchor[d];
  return total;
}

// bank rows [begin, begin + len) in the accumulation dtype (a view when it already is).
at::Tensor bank_chunk(const at::Tensor& bank, int64_t begin, int64_t len, at::ScalarType acc) {
  at::Tensor chunk = bank.narrow(0, begin, len);
  return chunk.scalar_type() == acc ? chunk : chunk.to(acc);
}

constexpr int64_t kChunkRows = 8192;

// S = anchors @ bank^T, [B, N] (row b: anchor b against every bank row), converting a
// half-precision bank chunk by chunk.
at::Tensor dense_scores(const at::Tensor& bank, const at::Tensor& anchors) {
  const auto acc = anchors.scalar_type();
  if (bank.scalar_type() == acc) return at::mm(anchors, bank.t());
  at::Tensor out = at::empty({anchors.size(0), bank.size(0)}, anchors.options());
  for (int64_t begin = 0; begin < bank.size(0); begin += kChunkRows) {
    const int64_t len = std::min(kChunkRows, bank.size(0) - begin);
    out.narrow(1, begin, len).copy_(at::mm(anchors, bank_chunk(bank, begin, len, acc).t()));
  }
  return out;
}

// grad = G @ bank for G = [B, N] holding d loss / d s at the drawn entries.
at::Tensor dense_gradient(const at::Tensor& g, const at::Tensor& bank) {
  const auto acc = g.scalar_type();
  if (bank.scalar_type() == acc) return at::mm(g, bank);
  at::Tensor grad = at::zeros({g.size(0), bank.size(1)}, g.options());
  for (int64_t begin = 0; begin < bank.size(0); begin += kChunkRows) {
    const int64_t len = std::min(kChunkRows, bank.size(0) - begin);
    grad.addmm_(g.narrow(1, begin, len), bank_chunk(bank, begin, len, acc));
  }
  return grad;
}

bool use_dense(int64_t batch, int64_t cols, int64_t num_data) {
  if (const char* forced = std::getenv("FASTKD_CRD_CPU_ALGO")) {
    const std::string algo(forced);
    TORCH_CHECK(algo == "dense" || algo == "gather", "FASTKD_CRD_CPU_ALGO must be 'dense' or 'gather', got '", algo, "'");
    return algo == "dense";
  }
  constexpr int64_t kMaxDenseEntries = int64_t{1} << 26;  // 256 MiB of fp32 scores
  return num_data <= batch * cols && num_data * batch <= kMaxDenseEntries;
}

// The passes of one crd_nce call over both sides (student anchors vs teacher bank and the reverse).
template <typename acc_t, typename bank_t>
class NcePasses {
 public:
  // ``track_estimate``: also form this batch's estimate of log Z when every Z is known (a Z moving average).
  NcePasses(std::vector<Side*>& sides, const ContrastRows& rows, int64_t batch, int64_t cols, int64_t num_data,
            double temperature, bool track_estimate)
      : sides_(sides), rows_(rows), batch_(batch), cols_(cols), num_data_(num_data),
        dim_(sides[0]->anchors.size(1)), temperature_(temperature),
        dense_(use_dense(batch, cols, num_data)),
        track_estimate_(track_estimate), loss_part_(sides.size() * batch), lse_top_(sides.size() * batch),
        lse_sum_(sides.size() * batch) {}

  void run(const std::vector<double>& log_z) {
    for (Side* side : sides_) {
      side->grad = at::zeros_like(side->anchors);
      if (dense_) side->dense = dense_scores(side->bank, side->anchors);
      bank_.push_back(side->bank.template data_ptr<bank_t>());
      stride_.push_back(side->bank.stride(0));
      anchor_.push_back(side->anchors.template data_ptr<acc_t>());
      grad_.push_back(side->grad.template data_ptr<acc_t>());
    }
    const bool known = std::all_of(log_z.begin(), log_z.end(), z_known);
    if (known) {
      for (size_t s = 0; s < sides_.size(); ++s) sides_[s]->log_z = log_z[s];
    } else {
      estimate_pass(log_z);  // the first step: Z comes from this batch's own scores
    }
    const bool track = known && track_estimate_;
    at::parallel_for(0, batch_, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> idx(cols_);
      std::vector<acc_t> local(sides_.size() * cols_);
      std::vector<acc_t*> rows(sides_.size());
      for (int64_t b = begin; b < end; ++b) {
        rows_.fill(b, idx.data());
        for (size_t s = 0; s < sides_.size(); ++s)
          rows[s] = known ? local.data() + s * cols_ : sides_[s]->logits.data_ptr<acc_t>() + b * cols_;
        if (known) gather_logits(b, idx.data(), rows.data());
        for (size_t s = 0; s < sides_.size(); ++s) {
          if (track) anchor_lse(s, b, rows[s]);
          score_anchor(*sides_[s], s, b, rows[s]);
        }
        scatter_anchor(b, idx.data(), rows.data());
      }
    });
    for (size_t s = 0; s < sides_.size(); ++s) {
      Side& side = *sides_[s];
      double loss = 0;
      for (int64_t b = 0; b < batch_; ++b) loss += loss_part_[s * batch_ + b];  // fixed order: deterministic
      side.loss = -loss / batch_;
      if (track) side.log_estimate = batch_log_estimate(s);
      if (dense_) side.grad = dense_gradient(side.dense, side.bank);
    }
  }

 private:
  // s/T for each of anchor b's drawn rows, for every side. Gathering, index-major: the sides' rows of one
  // index are read together (crd_nce_multi's [N, M, D] banks hold a sample's M rows side by side, so one index's
  // rows share pages and cache lines across the pairs instead of each pair walking its own bank).
  void gather_logits(int64_t b, const int64_t* idx, acc_t* const* out) const {
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature_);
    const size_t count = sides_.size();
    if (dense_) {
      for (size_t s = 0; s < count; ++s) {
        const acc_t* scores = sides_[s]->dense.template data_ptr<acc_t>() + b * num_data_;
        for (int64_t k = 0; k < cols_; ++k) out[s][k] = scores[idx[k]] * inv_t;
      }
      return;
    }
    for (int64_t k = 0; k < cols_; ++k) {
      for (size_t s = 0; s < count; ++s)
        out[s][k] = dot_row(bank_[s] + idx[k] * stride_[s], anchor_[s] + b * dim_, dim_) * inv_t;
    }
  }

  // Anchor b's NCE terms from log P = s/T - log Z (c = K/N + eps): the positive's
  // log(P / (P + c)) = -softplus(log c - log P), slope c / (P + c); a negative's
  // log(noise / (P + c)) = -log1p(eps / noise) - softplus(log P - log c), slope -P / (P + c).
  // Turns its logits into d loss / d s in place.
  void score_anchor(const Side& side, size_t s, int64_t b, acc_t* row) {
    const acc_t log_z = static_cast<acc_t>(side.log_z);
    const double noise = static_cast<double>(cols_ - 1) / num_data_;
    const acc_t log_c = static_cast<acc_t>(std::log(noise + kNceEps));
    const acc_t scale = static_cast<acc_t>(-1.0 / (batch_ * temperature_));
    acc_t softplus, sigmoid;
    softplus_sigmoid<acc_t>(log_c - (row[0] - log_z), softplus, sigmoid);
    double total = -static_cast<double>(softplus);
    row[0] = sigmoid * scale;
    for (int64_t k = 1; k < cols_; ++k) {
      softplus_sigmoid<acc_t>((row[k] - log_z) - log_c, softplus, sigmoid);
      total -= static_cast<double>(softplus);
      row[k] = -sigmoid * scale;
    }
    loss_part_[s * batch_ + b] = total - static_cast<double>(cols_ - 1) * std::log1p(kNceEps / noise);
  }

  // (max, sum exp(x - max)) of anchor b's logits x = s/T, for log Z's batch estimate.
  void anchor_lse(size_t s, int64_t b, const acc_t* row) {
    double high = -std::numeric_limits<double>::infinity(), total = 0;
    for (int64_t k = 0; k < cols_; ++k) high = std::max(high, static_cast<double>(row[k]));
    for (int64_t k = 0; k < cols_; ++k) total += std::exp(static_cast<double>(row[k]) - high);
    lse_top_[s * batch_ + b] = high;
    lse_sum_[s * batch_ + b] = total;
  }

  // log(mean(exp(s/T)) * N) over the batch, from the anchors' partials in a fixed order.
  double batch_log_estimate(size_t s) const {
    double high = -std::numeric_limits<double>::infinity(), total = 0;
    for (int64_t b = 0; b < batch_; ++b) high = std::max(high, lse_top_[s * batch_ + b]);
    for (int64_t b = 0; b < batch_; ++b) total += lse_sum_[s * batch_ + b] * std::exp(lse_top_[s * batch_ + b] - high);
    return high + std::log(total) - std::log(static_cast<double>(batch_ * cols_)) +
           std::log(static_cast<double>(num_data_));
  }

  // Anchor b's share of the gradient, every side: dense, row b of S becomes row b of G (this thread's own
  // row; duplicates add up); gather, grad_b += Σ_k d_k · bank[idx_k], index-major as gather_logits reads.
  void scatter_anchor(int64_t b, const int64_t* idx, acc_t* const* d) const {
    const size_t count = sides_.size();
    if (dense_) {
      for (size_t s = 0; s < count; ++s) {
        acc_t* g = sides_[s]->dense.template data_ptr<acc_t>() + b * num_data_;
        std::fill(g, g + num_data_, acc_t(0));
        for (int64_t k = 0; k < cols_; ++k) g[idx[k]] += d[s][k];
      }
      return;
    }
    for (int64_t k = 0; k < cols_; ++k) {
      for (size_t s = 0; s < count; ++s) {
        const bank_t* row = bank_[s] + idx[k] * stride_[s];
        acc_t* grad = grad_[s] + b * dim_;
        const acc_t weight = d[s][k];
        for (int64_t j = 0; j < dim_; ++j) grad[j] += weight * static_cast<acc_t>(row[j]);
      }
    }
  }

  // Every anchor's logits into side.logits, and log Z = log of mean(exp(s/T))·N where it is unknown.
  void estimate_pass(const std::vector<double>& log_z) {
    for (Side* side : sides_) side->logits = at::empty({batch_, cols_}, side->anchors.options());
    at::parallel_for(0, batch_, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> idx(cols_);
      std::vector<acc_t*> rows(sides_.size());
      for (int64_t b = begin; b < end; ++b) {
        rows_.fill(b, idx.data());
        for (size_t s = 0; s < sides_.size(); ++s) rows[s] = sides_[s]->logits.data_ptr<acc_t>() + b * cols_;
        gather_logits(b, idx.data(), rows.data());
        for (size_t s = 0; s < sides_.size(); ++s) anchor_lse(s, b, rows[s]);
      }
    });
    for (size_t s = 0; s < sides_.size(); ++s) {
      Side& side = *sides_[s];
      side.log_estimate = batch_log_estimate(s);
      side.log_z = z_known(log_z[s]) ? log_z[s] : side.log_estimate;
    }
  }

  std::vector<Side*>& sides_;
  const ContrastRows& rows_;
  const int64_t batch_, cols_, num_data_, dim_;
  const double temperature_;
  const bool dense_, track_estimate_;
  std::vector<double> loss_part_, lse_top_, lse_sum_;
  // each side's bank (its row stride), anchors and gradient rows, set when run() starts
  std::vector<const bank_t*> bank_;
  std::vector<int64_t> stride_;
  std::vector<const acc_t*> anchor_;
  std::vector<acc_t*> grad_;
};

void check_index_table(const at::Tensor& table, int64_t num_data, const char* name) {
  const int64_t* p = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < table.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < num_data, "crd_nce: ", name, " holds index ", p[i], ", outside [0, ", num_data, ")");
  }
}

}  // namespace

namespace {

// The checks both ops make of what they share (indices, temperature, Z momentum), and the contrast rows:
// the caller's [B, K+1] table or its positives + Philox. ``keep`` holds the contiguous index tensors the
// rows point into.
ContrastRows contrast_rows(const char* op, const at::Tensor& idx, const std::optional<at::Tensor>& contrast_idx,
                           const at::Tensor& rng_state, int64_t batch, int64_t num_negatives, int64_t num_data,
                           bool shared_negatives, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == batch && idx.scalar_type() == at::kLong, op, ": idx must be int64 [B]");
  const int64_t cols = contrast_idx.has_value() ? contrast_idx->size(1) : num_negatives + 1;
  TORCH_CHECK(cols >= 2, op, ": at least one negative is needed");
  ContrastRows rows;
  rows.negatives = cols - 1;
  rows.num_data = num_data;
  rows.shared = shared_negatives;
  keep.push_back(idx.contiguous());
  check_index_table(keep.back(), num_data, "idx");
  rows.positives = keep.back().data_ptr<int64_t>();
  if (contrast_idx.has_value()) {
    keep.push_back(contrast_idx->contiguous());
    const at::Tensor& table = keep.back();
    TORCH_CHECK(table.dim() == 2 && table.size(0) == batch && table.scalar_type() == at::kLong, op,
                ": contrast_idx must be int64 [B, K+1]");
    check_index_table(table, num_data, "contrast_idx");
    rows.table = table.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong, op, ": rng_state must be int64 [2]");
    const at::Tensor state = rng_state.contiguous();
    rows.seed = static_cast<uint64_t>(state.data_ptr<int64_t>()[0]);
    rows.offset = static_cast<uint64_t>(state.data_ptr<int64_t>()[1]);
  }
  return rows;
}

void check_step(const char* op, double temperature, double z_momentum) {
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0");
  TORCH_CHECK(z_momentum >= 0 && z_momentum <= 1, op, ": z_momentum must be in [0, 1], got ", z_momentum);
}

// Every side's NCE pass in one go: the contrast rows of each anchor drawn once for all the sides.
void run_sides(std::vector<Side*>& sides, const ContrastRows& rows, const std::vector<double>& log_z,
               at::ScalarType bank_dtype, int64_t batch, int64_t num_data, double temperature, double z_momentum) {
  const auto acc = sides[0]->anchors.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(acc, "crd_nce", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank_dtype, "crd_nce_bank", [&] {
      NcePasses<acc_t, scalar_t>(sides, rows, batch, rows.negatives + 1, num_data, temperature, z_momentum > 0)
          .run(log_z);
    });
  });
}

// log Z after the step: the estimate where unknown; else kept, or log(m Z + (1 - m) estimate).
double next_log_z(const Side& side, double value, double z_momentum) {
  if (!z_known(value)) return side.log_estimate;
  if (z_momentum > 0 && z_momentum < 1) {
    const double a = std::log(z_momentum) + value, b = std::log1p(-z_momentum) + side.log_estimate;
    return std::max(a, b) + std::log1p(std::exp(-std::abs(a - b)));
  }
  return value;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> crd_nce(
    const at::Tensor& v_s, const at::Tensor& v_t, const at::Tensor& memory_s, const at::Tensor& memory_t,
    const at::Tensor& idx, const std::optional<at::Tensor>& contrast_idx, const at::Tensor& log_z_s,
    const at::Tensor& log_z_t, const at::Tensor& rng_state, int64_t num_negatives, double temperature,
    double z_momentum, bool shared_negatives) {
  TORCH_CHECK(v_s.dim() == 2 && v_t.sizes() == v_s.sizes(), "crd_nce: v_s and v_t must both be [B, D]");
  // before any value is read: an empty batch would estimate Z from no score at all (log 0)
  TORCH_CHECK(v_s.size(0) >= 1, "crd_nce: v_s has 0 rows (shape ", v_s.sizes(),
              "); the op needs an [B, D] batch with B >= 1");
  TORCH_CHECK(memory_s.dim() == 2 && memory_t.sizes() == memory_s.sizes() && memory_s.size(1) == v_s.size(1),
              "crd_nce: memory_s and memory_t must both be [N, D] with D = v_s.size(1)");
  TORCH_CHECK(memory_s.scalar_type() == memory_t.scalar_type(), "crd_nce: the two banks must share a dtype");
  TORCH_CHECK(v_s.scalar_type() == v_t.scalar_type(), "crd_nce: v_s and v_t must share a dtype");
  check_step("crd_nce", temperature, z_momentum);
  TORCH_CHECK(log_z_s.numel() == 1 && log_z_t.numel() == 1, "crd_nce: log_z_s and log_z_t must hold one value each");
  const int64_t batch = v_s.size(0), num_data = memory_s.size(0);
  std::vector<at::Tensor> keep;
  const ContrastRows rows = contrast_rows("crd_nce", idx, contrast_idx, rng_state, batch, num_negatives, num_data,
                                          shared_negatives, keep);

  const auto acc = at::promote_types(v_s.scalar_type(), at::kFloat);
  Side student, teacher;  // student anchors against the teacher bank, and the reverse
  student.anchors = v_s.to(acc).contiguous();
  student.bank = memory_t.contiguous();
  teacher.anchors = v_t.to(acc).contiguous();
  teacher.bank = memory_s.contiguous();
  std::vector<Side*> sides = {&student, &teacher};
  const std::vector<double> log_z = {log_z_s.item<double>(), log_z_t.item<double>()};
  run_sides(sides, rows, log_z, memory_s.scalar_type(), batch, num_data, temperature, z_momentum);

  at::Tensor loss = at::full({}, student.loss + teacher.loss, v_s.options().dtype(acc));
  return {loss, at::full({}, next_log_z(student, log_z[0], z_momentum), log_z_s.options()),
          at::full({}, next_log_z(teacher, log_z[1], z_momentum), log_z_t.options()),
          student.grad.to(v_s.scalar_type()), teacher.grad.to(v_t.scalar_type())};
}

// M (student, teacher) pairs sharing each anchor's contrast rows: v_s, v_t [M, B, D], banks [M, N, D],
// log Z [M]; sides 2m and 2m + 1 are pair m's student anchors against its teacher bank and the reverse. The banks
// are [N, M, D]: a sample's M rows side by side, so that the pairs' rows of one drawn index are read together.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> crd_nce_multi(
    const at::Tensor& v_s, const at::Tensor& v_t, const at::Tensor& memory_s, const at::Tensor& memory_t,
    const at::Tensor& idx, const std::optional<at::Tensor>& contrast_idx, const at::Tensor& log_z_s,
    const at::Tensor& log_z_t, const at::Tensor& rng_state, int64_t num_negatives, double temperature,
    double z_momentum, bool shared_negatives) {
  const char* op = "crd_nce_multi";
  TORCH_CHECK(v_s.dim() == 3 && v_t.sizes() == v_s.sizes(), op, ": v_s and v_t must both be [M, B, D]");
  TORCH_CHECK(v_s.size(0) >= 1, op, ": v_s holds no pair (shape ", v_s.sizes(), "); M must be >= 1");
  TORCH_CHECK(v_s.size(1) >= 1, op, ": v_s has 0 rows (shape ", v_s.sizes(), "); the op needs B >= 1 anchors");
  TORCH_CHECK(memory_s.dim() == 3 && memory_t.sizes() == memory_s.sizes() && memory_s.size(1) == v_s.size(0) &&
                  memory_s.size(2) == v_s.size(2),
              op, ": memory_s and memory_t must both be [N, M, D] with M, D those of v_s");
  TORCH_CHECK(memory_s.scalar_type() == memory_t.scalar_type(), op, ": the banks must share a dtype");
  TORCH_CHECK(v_s.scalar_type() == v_t.scalar_type(), op, ": v_s and v_t must share a dtype");
  check_step(op, temperature, z_momentum);
  const int64_t pairs = v_s.size(0), batch = v_s.size(1), num_data = memory_s.size(0);
  TORCH_CHECK(log_z_s.dim() == 1 && log_z_s.size(0) == pairs && log_z_t.sizes() == log_z_s.sizes(), op,
              ": log_z_s and log_z_t must be [M]");
  std::vector<at::Tensor> keep;
  const ContrastRows rows = contrast_rows(op, idx, contrast_idx, rng_state, batch, num_negatives, num_data,
                                          shared_negatives, keep);

  const auto acc = at::promote_types(v_s.scalar_type(), at::kFloat);
  const at::Tensor anchors_s = v_s.to(acc).contiguous(), anchors_t = v_t.to(acc).contiguous();
  const at::Tensor banks_s = memory_s.contiguous(), banks_t = memory_t.contiguous();
  const at::Tensor z_s = log_z_s.to(at::kDouble).contiguous(), z_t = log_z_t.to(at::kDouble).contiguous();
  std::vector<Side> storage(2 * pairs);
  std::vector<Side*> sides;
  std::vector<double> log_z;
  for (int64_t m = 0; m < pairs; ++m) {
    storage[2 * m].anchors = anchors_s.select(0, m);
    storage[2 * m].bank = banks_t.select(1, m);
    storage[2 * m + 1].anchors = anchors_t.select(0, m);
    storage[2 * m + 1].bank = banks_s.select(1, m);
    log_z.push_back(z_s.data_ptr<double>()[m]);
    log_z.push_back(z_t.data_ptr<double>()[m]);
  }
  for (Side& side : storage) sides.push_back(&side);
  if (use_dense(batch, rows.negatives + 1, num_data)) {
    // dense: pair after pair, so that each pair's [B, N] score matrices are read while they are in cache (all
    // 2M at once measured 12% slower at M = 8, B = 64, N = 50,000 on 2 cores); gather: every anchor's rows of all
    // 2M banks in one index-major pass (NcePasses::gather_logits)
    for (int64_t m = 0; m < pairs; ++m) {
      std::vector<Side*> pair = {sides[2 * m], sides[2 * m + 1]};
      run_sides(pair, rows, {log_z[2 * m], log_z[2 * m + 1]}, memory_s.scalar_type(), batch, num_data, temperature,
                z_momentum);
    }
  } else {
    run_sides(sides, rows, log_z, memory_s.scalar_type(), batch, num_data, temperature, z_momentum);
  }

  std::vector<double> losses(pairs), next_s(pairs), next_t(pairs);
  std::vector<at::Tensor> grads_s, grads_t;
  for (int64_t m = 0; m < pairs; ++m) {
    const Side &student = storage[2 * m], &teacher = storage[2 * m + 1];
    losses[m] = student.loss + teacher.loss;
    next_s[m] = next_log_z(student, log_z[2 * m], z_momentum);
    next_t[m] = next_log_z(teacher, log_z[2 * m + 1], z_momentum);
    grads_s.push_back(student.grad);
    grads_t.push_back(teacher.grad);
  }
  auto as_tensor = [&](const std::vector<double>& values, const at::TensorOptions& options) {
    return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(options);
  };
  return {as_tensor(losses, v_s.options().dtype(acc)), as_tensor(next_s, log_z_s.options()),
          as_tensor(next_t, log_z_t.options()), at::stack(grads_s).to(v_s.scalar_type()),
          at::stack(grads_t).to(v_t.scalar_type())};
}

}  // namespace fastkd::cpu

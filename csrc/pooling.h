// Shared pieces of the pooling ops (temporal_pool, set_pool_hpp): argument checks used by every
// C++ backend (so each error reads the same) and the two small tables every kernel walks:
//   sequences: output row n' reads frames [start, start + len) of batch item `item`
//   strips:    output column j averages / maxes rows [row0, row1) of the temporal max
// qgait/ops/pooling.py documents the math.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace qgait {

enum PoolMode : int64_t { kMeanMax = 0, kMax = 1, kMean = 2 };

struct PoolSeq {
  int32_t item, start, len;
};

struct PoolStrip {
  int32_t row0, row1;
};

// x is [N, C, T, H, W]; seqL empty means one sequence per batch item.
inline std::vector<PoolSeq> pool_sequences(const char* op, const at::Tensor& x,
                                           at::IntArrayRef seqL) {
  QGAIT_CHECK(x.dim() == 5, op, "x must have 5 dims [N, C, T, H, W], got shape ", x.sizes());
  QGAIT_CHECK(dtype_code(x.scalar_type()) >= 0, op,
              "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  QGAIT_CHECK(x.numel() > 0, op, "x must not be empty, got shape ", x.sizes());
  const int64_t N = x.size(0), T = x.size(2);
  std::vector<PoolSeq> seqs;
  if (seqL.empty()) {
    for (int64_t n = 0; n < N; ++n)
      seqs.push_back({static_cast<int32_t>(n), 0, static_cast<int32_t>(T)});
    return seqs;
  }
  QGAIT_CHECK(N == 1, op, "with seqL the sequences are packed along T, so N must be 1, got N=", N);
  int64_t start = 0;
  for (int64_t l : seqL) {
    QGAIT_CHECK(l > 0, op, "every sequence length in seqL must be > 0, got ", seqL);
    seqs.push_back({0, static_cast<int32_t>(start), static_cast<int32_t>(l)});
    start += l;
  }
  QGAIT_CHECK(start == T, op, "seqL sums to ", start, " but x has T=", T, " frames");
  return seqs;
}

inline std::vector<PoolStrip> pool_strips(const char* op, int64_t H, at::IntArrayRef bins,
                                          int64_t mode) {
  QGAIT_CHECK(mode >= 0 && mode <= 2, op, "mode must be 0 (mean+max), 1 (max) or 2 (mean), got ",
              mode);
  QGAIT_CHECK(!bins.empty(), op, "bins must not be empty");
  std::vector<PoolStrip> strips;
  for (int64_t b : bins) {
    QGAIT_CHECK(b > 0, op, "every bin must be > 0, got ", bins);
    QGAIT_CHECK(b <= H, op, "H=", H, " is smaller than the bin ", b, " (a strip would have no rows)");
    // adaptive pooling's boundaries: [floor(i H / b), ceil((i + 1) H / b))
    for (int64_t i = 0; i < b; ++i)
      strips.push_back({static_cast<int32_t>(i * H / b),
                        static_cast<int32_t>(((i + 1) * H + b - 1) / b)});
  }
  return strips;
}

// What a backward learns from its arguments, checked once for every backend.
struct PoolBackward {
  std::vector<PoolSeq> seqs;
  std::vector<PoolStrip> strips;  // empty for temporal_pool
  int64_t NO, C, T, H, W, HW, B;
  bool with_t, with_s;  // arg-max indices over T (T > 1) / over strips (mode != mean) in use
};

// Checks the arguments of set_pool_hpp_backward (hpp) or temporal_pool_backward: x_shape, grad
// (dtype and the forward's output shape) and the forward's int32 indices targ / sarg.
inline PoolBackward check_pool_backward(const char* op, bool hpp, const at::Tensor& grad,
                                        const at::Tensor& targ, const at::Tensor* sarg,
                                        at::IntArrayRef x_shape, at::IntArrayRef seqL,
                                        at::IntArrayRef bins, int64_t mode) {
  QGAIT_CHECK(x_shape.size() == 5, op, "x_shape must have 5 entries, got ", x_shape);
  QGAIT_CHECK(dtype_code(grad.scalar_type()) >= 0, op,
              "grad must be float32, float16 or bfloat16, got ", grad.scalar_type());
  PoolBackward a;
  a.seqs = pool_sequences(op, at::empty(x_shape, grad.options().device(at::kMeta)), seqL);
  a.C = x_shape[1], a.T = x_shape[2], a.H = x_shape[3], a.W = x_shape[4], a.HW = a.H * a.W;
  a.NO = static_cast<int64_t>(a.seqs.size());
  if (hpp) a.strips = pool_strips(op, a.H, bins, mode);
  a.B = static_cast<int64_t>(a.strips.size());
  if (hpp) {
    QGAIT_CHECK(grad.dim() == 3 && grad.size(0) == a.NO && grad.size(1) == a.C &&
                    grad.size(2) == a.B,
                op, "grad must have shape [", a.NO, ", ", a.C, ", ", a.B, "], got ", grad.sizes());
  } else {
    QGAIT_CHECK(grad.dim() == 4 && grad.size(0) == a.NO && grad.size(1) == a.C &&
                    grad.size(2) == a.H && grad.size(3) == a.W,
                op, "grad must have shape [", a.NO, ", ", a.C, ", ", a.H, ", ", a.W, "], got ",
                grad.sizes());
  }
  a.with_t = a.T > 1;
  a.with_s = hpp && mode != kMean;
  QGAIT_CHECK(!a.with_t || (targ.scalar_type() == at::kInt && targ.numel() == a.NO * a.C * a.HW),
              op, "targ must be int32 [", a.NO, ", ", a.C, ", ", a.H, ", ", a.W,
              "] (the forward's indices)");
  QGAIT_CHECK(!a.with_s || (sarg->scalar_type() == at::kInt && sarg->numel() == a.NO * a.C * a.B),
              op, "sarg must be int32 [", a.NO, ", ", a.C, ", ", a.B, "] (the forward's indices)");
  // A kernel would dereference an index tensor on another device (a host pointer on the GPU).
  QGAIT_CHECK(!a.with_t || targ.device() == grad.device(), op, "targ is on ", targ.device(),
              " but grad is on ", grad.device(), " (pass the forward's indices unchanged)");
  QGAIT_CHECK(!a.with_s || sarg->device() == grad.device(), op, "sarg is on ", sarg->device(),
              " but grad is on ", grad.device(), " (pass the forward's indices unchanged)");
  return a;
}

}  // namespace qgait

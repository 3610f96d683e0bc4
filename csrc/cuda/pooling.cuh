// Raw-pointer CUDA launchers of the pooling ops (no torch headers; the torch glue is
// pooling_bind.cpp). qgait/ops/pooling.py documents the math.
//
// One thread block per work item (output row n', channel c). x / dx are contiguous
// [N, C, T, H, W]; output row n' is either batch item n' (no seqL) or the n'-th sequence packed
// along T of item 0 (seqL). Everything a kernel needs to find its frames and strips (sequence
// starts, pyramid levels) travels by value in the kernel arguments (PoolArgs): no device
// tables, so a call never copies host data to the GPU, never syncs the host and can be
// captured in a CUDA graph. A call with more than kPoolSeqChunk packed sequences is split into
// several launches. dtype: 0 = float32, 1 = float16, 2 = bfloat16.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace qgait::cuda {

constexpr int kPoolMaxLevels = 16;  // entries of `bins` (pyramid levels) one call takes
constexpr int kPoolSeqChunk = 128;  // packed sequences per launch

// One call, as the torch glue sees it (host memory; the launcher turns it into PoolArgs).
struct PoolCall {
  int64_t N, C, T, H, W;        // x [N, C, T, H, W]
  const int64_t* seqL;          // packed sequence lengths (sum = T, N = 1), or null
  int64_t nseq;                 // entries of seqL; 0: one sequence per batch item
  const int64_t* bins;          // strips per pyramid level (hpp only)
  int64_t nbins;
  int mode;                     // 0 mean+max, 1 max, 2 mean (hpp only)
  bool hpp;                     // false: temporal pooling alone, out is [N', C, H, W]
};

// Why this call cannot run on a device with `smem_optin` bytes of opt-in shared memory per
// block, or nullptr if it can (qgait/ops/pooling.py's cuda backend states the same reasons).
const char* pool_cuda_limit(const PoolCall& call, int64_t smem_optin);

// Bytes of dynamic shared memory the forward (backward) kernel of this call needs.
int64_t pool_smem_bytes(const PoolCall& call, bool backward);

// targ (int32 [N', C, H, W]) / sarg (int32 [N', C, B]) are written when not null.
cudaError_t pool_forward(const void* x, void* out, int32_t* targ, int32_t* sarg,
                         const PoolCall& call, int dtype, cudaStream_t stream);

// targ null: one frame per sequence (T = 1). sarg is read when mode has a max term.
cudaError_t pool_backward(const void* grad, const int32_t* targ, const int32_t* sarg, void* dx,
                          const PoolCall& call, int dtype, cudaStream_t stream);

}  // namespace qgait::cuda

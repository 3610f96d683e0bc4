// Raw-pointer CUDA launchers of the pooling ops (no torch headers; the torch glue is
// pooling_bind.cpp). qgait/ops/pooling.py documents the math.
//
// One thread block per work item (output row n', channel c). Tables (device memory):
//   seq_base[n']  element offset of channel 0's first frame of sequence n' in x / dx
//   seq_len[n']   frames of sequence n'
//   row0[j], row1[j]  rows [row0, row1) of strip j (all levels concatenated)
// cstride = T*H*W is the channel stride. dtype: 0 = float32, 1 = float16, 2 = bfloat16.
// hpp = false runs temporal pooling alone (out is [N', C, H, W], no strips).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace qgait::cuda {

// Largest H*W whose fp32 map (plus row statistics) fits the default 48 KiB of shared memory.
constexpr int64_t kPoolMaxHW = 10240;

// targ (int32 [N', C, H, W]) / sarg (int32 [N', C, B]) are written when not null.
cudaError_t pool_forward(const void* x, void* out, int32_t* targ, int32_t* sarg,
                         const int64_t* seq_base, const int32_t* seq_len, const int32_t* row0,
                         const int32_t* row1, int64_t n_out, int64_t C, int64_t cstride,
                         int64_t H, int64_t W, int64_t B, int mode, bool hpp, int dtype,
                         cudaStream_t stream);

// targ null: one frame per sequence (T = 1). sarg is read when mode has a max term.
cudaError_t pool_backward(const void* grad, const int32_t* targ, const int32_t* sarg, void* dx,
                          const int64_t* seq_base, const int32_t* seq_len, const int32_t* row0,
                          const int32_t* row1, int64_t n_out, int64_t C, int64_t cstride,
                          int64_t H, int64_t W, int64_t B, int mode, bool hpp, int dtype,
                          cudaStream_t stream);

}  // namespace qgait::cuda

// CUDA soft fake-quant kernels (math: qgait/ops/soft_quant.py; launchers: soft_fake_quant.cuh).
//
// The per-element math lives in soft_fake_quant_math.cuh (host + device, exact under
// --use_fast_math, elementwise equal to the CPU kernel's). Flush-to-zero (part of fast math)
// remains: only steps below FLT_MIN, absurd for quantization, differ from torch.
//
// Layout: x is [outer, C, inner] with step scale[c]. The forward is one flat grid-stride loop
// (16-byte vector loads when aligned); the backward has two shapes of kernel:
//  * rows (inner >= kRowsMinInner): a block owns one segment of one (o, c) row: one step per
//    block, vector loads along the row;
//  * columns (small inner, e.g. channels last): x as [outer, C * inner]; a block owns 32
//    columns x a chunk of rows, lanes read consecutive columns (coalesced).
// Each block writes its step-gradient partial to partial[c * K + j] (fixed j), and
// sfq_ds_finish_kernel sums the K partials of each step in a fixed order: results are
// reproducible run to run, with no float atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cassert>  // __assert_fail (device-side assert that survives NDEBUG)
#include <cfloat>
#include <cstdio>

#include "launch.cuh"
#include "soft_fake_quant.cuh"
#include "soft_fake_quant_math.cuh"

namespace qgait::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsMinInner = 128;  // below this, the columns kernel
constexpr int kColTile = 32, kColRowThreads = 8;
#ifndef QGAIT_EMU_SMALL_GRID
constexpr int64_t kSegLen = 8192;      // elements of a row segment (rows kernel), mult. of 8
constexpr int64_t kColChunkRows = 128;  // rows of one columns-kernel block (16 per thread)
constexpr int64_t kMaxGrid = int64_t(1) << 20;
constexpr int64_t kMaxGridY = 65535;    // the hardware's gridDim.y limit
#else  // emulation: several segments, chunks and grid-stride rounds on small tensors
constexpr int64_t kSegLen = 64;
constexpr int64_t kColChunkRows = 16;
constexpr int64_t kMaxGrid = 3;
constexpr int64_t kMaxGridY = 2;
#endif

// ---- element conversion and 16-byte vector access ------------------------------------------
template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC = 1 (scalar) or 16 / sizeof(T) (one uint4: 4 floats or 8 16-bit values).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    f[0] = to_f32(p[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "one uint4 per vector");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = to_f32(e[j]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = from_f32<T>(f[0]);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = from_f32<T>(f[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// ---- steps ---------------------------------------------------------------------------------
// Set by the first thread that finds a bad step: only that thread reports it and asserts
// (every thread that reads the step would otherwise print, thousands of identical lines). The
// assert ends the kernel and leaves the context unusable, so the flag never needs a reset.
__device__ int g_bad_step_reported = 0;

// Loads step c and checks it on the device (no host sync): NaN, inf and s <= 0 all fail
// `s > 0 && s <= FLT_MAX`.
__device__ __forceinline__ float load_step(const float* __restrict__ scale, int64_t c) {
  const float s = __ldg(scale + c);
  if (!(s > 0.f && s <= FLT_MAX) && atomicCAS(&g_bad_step_reported, 0, 1) == 0) {
    printf("qgait::soft_fake_quant: scale[%lld] = %g; every step must be finite and > 0\n",
           static_cast<long long>(c), s);
    __assert_fail("qgait::soft_fake_quant: scale must be finite and > 0", __FILE__, __LINE__,
                  __func__);
  }
  return s;
}

// ---- deterministic block sums (fixed shuffle tree, then warp sums in lane order) -----------
// Every thread of the block must call it; blockDim.x * blockDim.y is a multiple of 32. The
// result is valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int nwarps = (blockDim.x * blockDim.y) / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((tid & 31) == 0) warp_sums[tid >> 5] = v;
  __syncthreads();
  A t = A(0);
  if (tid < 32) {
    t = tid < nwarps ? warp_sums[tid] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
  }
  __syncthreads();  // warp_sums may be reused by the caller's next iteration
  return t;
}

// ---- forward --------------------------------------------------------------------------------
// How an element finds its step: one for all (C == 1); one per vector (inner % VEC == 0);
// channels last (inner == 1, consecutive elements step through channels); any other layout.
enum class Ch { Tensor, Row, Last, Any };

template <typename T, int VEC, Ch MODE>
__global__ void __launch_bounds__(kThreads)
sfq_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ scale,
               int64_t n, int64_t C, int64_t inner, SfqConsts P) {
  const int64_t ngroups = n / VEC;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  float s0 = 0.f, r0 = 0.f;
  if constexpr (MODE == Ch::Tensor) {
    s0 = load_step(scale, 0);
    r0 = rcp_rn(s0);
  }
  for (int64_t g = tid; g < ngroups; g += stride) {
    const int64_t i0 = g * VEC;
    float f[VEC];
    load_vec<T, VEC>(x + i0, f);
    if constexpr (MODE == Ch::Tensor) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] = fwd_elem(f[j], s0, r0, P);
    } else if constexpr (MODE == Ch::Row) {
      const float s = load_step(scale, (i0 / inner) % C), r = rcp_rn(s);
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] = fwd_elem(f[j], s, r, P);
    } else if constexpr (MODE == Ch::Last) {
      int64_t c = i0 % C;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float s = load_step(scale, c);
        f[j] = fwd_elem(f[j], s, rcp_rn(s), P);
        c = (c + 1 == C) ? 0 : c + 1;
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float s = load_step(scale, ((i0 + j) / inner) % C);
        f[j] = fwd_elem(f[j], s, rcp_rn(s), P);
      }
    }
    store_vec<T, VEC>(y + i0, f);
  }
  // Tail (< VEC elements), one element per thread of the first block.
  const int64_t i = ngroups * VEC + tid;
  if (VEC > 1 && i < n) {
    const float s = MODE == Ch::Tensor ? s0 : load_step(scale, (i / inner) % C);
    const float r = MODE == Ch::Tensor ? r0 : rcp_rn(s);
    y[i] = from_f32<T>(fwd_elem(to_f32(x[i]), s, r, P));
  }
}

// ---- backward: rows kernel -------------------------------------------------------------------
// Logical block b = (row, seg) with row = o * C + c; it handles elements
// [seg * kSegLen, min(inner, (seg + 1) * kSegLen)) of that row and writes its partial to
// partial[c * (outer * nseg) + o * nseg + seg]. The grid loops over logical blocks.
template <typename T, int VEC>
__global__ void sfq_bwd_rows_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                                    T* __restrict__ dx, float* __restrict__ partial,
                                    const float* __restrict__ scale, int64_t outer, int64_t C,
                                    int64_t inner, int64_t nseg, SfqConsts P) {
  const int64_t nblocks = outer * C * nseg;
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t row = b / nseg, seg = b % nseg;
    const int64_t o = row / C, c = row % C;
    const float s = load_step(scale, c), r = rcp_rn(s);
    const int64_t base = row * inner;
    const int64_t lo = seg * kSegLen;
    const int64_t hi = lo + kSegLen < inner ? lo + kSegLen : inner;
    const int64_t hv = lo + (hi - lo) / VEC * VEC;  // end of the vector part
    float acc = 0.f;
    for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC; i < hv;
         i += static_cast<int64_t>(blockDim.x) * VEC) {
      float g[VEC], xv[VEC], d[VEC];
      load_vec<T, VEC>(gy + base + i, g);
      load_vec<T, VEC>(x + base + i, xv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float t;
        bwd_elem(g[j], xv[j], r, P, d[j], t);
        acc += t;
      }
      if (dx != nullptr) store_vec<T, VEC>(dx + base + i, d);
    }
    for (int64_t i = hv + threadIdx.x; i < hi; i += blockDim.x) {
      float d, t;
      bwd_elem(to_f32(gy[base + i]), to_f32(x[base + i]), r, P, d, t);
      acc += t;
      if (dx != nullptr) dx[base + i] = from_f32<T>(d);
    }
    if (partial != nullptr) {  // uniform across the block
      acc = block_sum(acc);
      if (threadIdx.x == 0) partial[c * (outer * nseg) + o * nseg + seg] = acc;
    }
  }
}

// ---- backward: columns kernel ----------------------------------------------------------------
// x as [M = outer, W = C * inner]; column j has step j / inner. Block (32, 8) owns columns
// [32 bx, 32 bx + 32) and rows [chunk * rpc, (chunk + 1) * rpc); thread (tx, ty) walks rows
// ty, ty + 8, ... of its column, then the 8 row-lanes are summed in order into
// partial[j * nchunks + chunk] (= partial[c * K + i * nchunks + chunk], K = inner * nchunks).
template <typename T>
__global__ void __launch_bounds__(kColTile * kColRowThreads)
sfq_bwd_cols_kernel(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ dx,
                    float* __restrict__ partial, const float* __restrict__ scale, int64_t M,
                    int64_t W, int64_t inner, int64_t rpc, int64_t nchunks, SfqConsts P) {
  __shared__ float lanes[kColRowThreads][kColTile + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const bool valid = j < W;
  const float r = valid ? rcp_rn(load_step(scale, j / inner)) : 1.f;
  for (int64_t chunk = blockIdx.y; chunk < nchunks; chunk += gridDim.y) {
    const int64_t m_hi = (chunk + 1) * rpc < M ? (chunk + 1) * rpc : M;
    float acc = 0.f;
    if (valid) {
      for (int64_t m = chunk * rpc + threadIdx.y; m < m_hi; m += kColRowThreads) {
        const int64_t e = m * W + j;
        float d, t;
        bwd_elem(to_f32(gy[e]), to_f32(x[e]), r, P, d, t);
        acc += t;
        if (dx != nullptr) dx[e] = from_f32<T>(d);
      }
    }
    if (partial != nullptr) {
      lanes[threadIdx.y][threadIdx.x] = acc;
      __syncthreads();
      if (threadIdx.y == 0 && valid) {
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < kColRowThreads; ++k) sum += lanes[k][threadIdx.x];
        partial[j * nchunks + chunk] = sum;
      }
      __syncthreads();
    }
  }
}

// ds[c] = gamma * sum_{j < K} partial[c * K + j], in fp64 and a fixed order.
__global__ void sfq_ds_finish_kernel(const float* __restrict__ partial, float* __restrict__ ds,
                                     int64_t C, int64_t K, double gamma) {
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    double acc = 0.0;
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) acc += partial[c * K + j];
    acc = block_sum(acc);
    if (threadIdx.x == 0) ds[c] = static_cast<float>(acc * gamma);
  }
}

// ---- launch helpers --------------------------------------------------------------------------
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Rows per columns-kernel chunk: kColChunkRows, grown (in multiples of 8) so that the chunk
// count fits gridDim.y. Depends on the shape only, so the reduction order does too.
int64_t col_rows_per_chunk(int64_t M) {
  const int64_t need = cdiv(M, 65535);
  return need <= kColChunkRows ? kColChunkRows : cdiv(need, 8) * 8;
}

template <typename T, int VEC, Ch MODE>
void launch_fwd(const T* x, T* y, const float* scale, int64_t n, int64_t C, int64_t inner,
                const SfqConsts& P, cudaStream_t stream) {
  const int64_t blocks = min64(kMaxGrid, cdiv(n / VEC > 0 ? n / VEC : 1, kThreads));
  QGAIT_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, sfq_fwd_kernel<T, VEC, MODE>)(
      x, y, scale, n, C, inner, P);
}

template <typename T>
void forward_t(const T* x, T* y, const float* scale, int64_t outer, int64_t C, int64_t inner,
               const SfqConsts& P, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t n = outer * C * inner;
  if (aligned16(x) && aligned16(y)) {
    if (C == 1) return launch_fwd<T, V, Ch::Tensor>(x, y, scale, n, C, inner, P, stream);
    if (inner % V == 0) return launch_fwd<T, V, Ch::Row>(x, y, scale, n, C, inner, P, stream);
    if (inner == 1) return launch_fwd<T, V, Ch::Last>(x, y, scale, n, C, inner, P, stream);
    return launch_fwd<T, V, Ch::Any>(x, y, scale, n, C, inner, P, stream);
  }
  if (C == 1) return launch_fwd<T, 1, Ch::Tensor>(x, y, scale, n, C, inner, P, stream);
  return launch_fwd<T, 1, Ch::Row>(x, y, scale, n, C, inner, P, stream);
}

template <typename T>
void backward_t(const T* gy, const T* x, T* dx, float* ds, float* ws, const float* scale,
                int64_t outer, int64_t C, int64_t inner, const SfqConsts& P, double gamma,
                cudaStream_t stream) {
  float* partial = ds != nullptr ? ws : nullptr;
  int64_t K;
  if (inner >= kRowsMinInner) {
    constexpr int V = 16 / sizeof(T);
    const int64_t nseg = cdiv(inner, kSegLen);
    const int64_t nblocks = outer * C * nseg;
    const int64_t blocks = min64(kMaxGrid, nblocks);
    // Vector loads need every row start aligned: aligned bases and inner % V == 0.
    const bool vec = inner % V == 0 && aligned16(gy) && aligned16(x) &&
                     (dx == nullptr || aligned16(dx));
    // Threads: enough for one pass over a segment, at most kThreads (a multiple of 32).
    const int64_t per = cdiv(min64(inner, kSegLen), vec ? V : 1);
    const int threads = static_cast<int>(min64(kThreads, cdiv(per, 32) * 32));
    if (vec) {
      QGAIT_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, sfq_bwd_rows_kernel<T, V>)(
          gy, x, dx, partial, scale, outer, C, inner, nseg, P);
    } else {
      QGAIT_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, sfq_bwd_rows_kernel<T, 1>)(
          gy, x, dx, partial, scale, outer, C, inner, nseg, P);
    }
    K = outer * nseg;
  } else {
    const int64_t W = C * inner;
    const int64_t rpc = col_rows_per_chunk(outer);
    const int64_t nchunks = cdiv(outer, rpc);
    const dim3 grid(static_cast<unsigned>(cdiv(W, kColTile)),
                    static_cast<unsigned>(min64(nchunks, kMaxGridY)));
    QGAIT_LAUNCH(grid, dim3(kColTile, kColRowThreads), 0, stream, sfq_bwd_cols_kernel<T>)(
        gy, x, dx, partial, scale, outer, W, inner, rpc, nchunks, P);
    K = inner * nchunks;
  }
  if (ds != nullptr) {
    const int threads = K >= kThreads ? kThreads : 32;
    QGAIT_LAUNCH(static_cast<unsigned>(min64(C, kMaxGrid)), threads, 0, stream,
                 sfq_ds_finish_kernel)(partial, ds, C, K, gamma);
  }
}

}  // namespace

cudaError_t sfq_forward_cuda(const void* x, void* y, const float* scale, int dtype,
                             int64_t outer, int64_t C, int64_t inner, const SfqConsts& p,
                             cudaStream_t stream) {
  if (outer * C * inner == 0) return cudaSuccess;
  switch (dtype) {
    case kDtypeF32:
      forward_t(static_cast<const float*>(x), static_cast<float*>(y), scale, outer, C, inner,
                p, stream);
      break;
    case kDtypeF16:
      forward_t(static_cast<const __half*>(x), static_cast<__half*>(y), scale, outer, C, inner,
                p, stream);
      break;
    case kDtypeBF16:
      forward_t(static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y), scale,
                outer, C, inner, p, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int64_t sfq_backward_workspace(int64_t outer, int64_t C, int64_t inner) {
  if (inner >= kRowsMinInner) return C * outer * cdiv(inner, kSegLen);
  return C * inner * cdiv(outer, col_rows_per_chunk(outer));
}

cudaError_t sfq_backward_cuda(const void* grad_y, const void* x, void* dx, float* ds,
                              float* workspace, const float* scale, int dtype, int64_t outer,
                              int64_t C, int64_t inner, const SfqConsts& p, double gamma,
                              cudaStream_t stream) {
  if (outer * C * inner == 0 || (dx == nullptr && ds == nullptr)) return cudaSuccess;
  switch (dtype) {
    case kDtypeF32:
      backward_t(static_cast<const float*>(grad_y), static_cast<const float*>(x),
                 static_cast<float*>(dx), ds, workspace, scale, outer, C, inner, p, gamma,
                 stream);
      break;
    case kDtypeF16:
      backward_t(static_cast<const __half*>(grad_y), static_cast<const __half*>(x),
                 static_cast<__half*>(dx), ds, workspace, scale, outer, C, inner, p, gamma,
                 stream);
      break;
    case kDtypeBF16:
      backward_t(static_cast<const __nv_bfloat16*>(grad_y),
                 static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(dx), ds,
                 workspace, scale, outer, C, inner, p, gamma, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace qgait::cuda

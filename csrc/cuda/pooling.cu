// CUDA temporal pooling + horizontal pyramid pooling (see pooling.cuh for the layout).
// Means divide with __fdiv_rn: the build's --use_fast_math would otherwise make `/` the
// approximate div.approx, and the CPU backend rounds the IEEE way.
// Forward: threads of a block own map positions p (strided by blockDim, so each frame is read
// coalesced), fold the frames with a running max and first arg-max into registers, and leave
// the fp32 map z in shared memory; row sums / maxima are reduced from it by one thread per row,
// and each strip is assembled from its rows by one thread per strip (gait maps are small:
// H <= 64, W <= 44). Maxima follow torch.max(dim): scanning t, rows, then columns, a value
// replaces the running maximum when it is larger, or NaN over a non-NaN (the first NaN wins and
// stays); ties keep the first index. Backward: dL/dz is built in shared memory in a fixed order (deterministic,
// no atomics), then every frame of dx is written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.cuh"
#include "pooling.cuh"

namespace qgait::cuda {
namespace {

constexpr int kThreads = 256;

// x replaces the running maximum m (torch.max's rule, as the CPU kernels' beats()).
__device__ __forceinline__ bool beats(float x, float m) { return !(x <= m) && m == m; }

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The kernels' arguments, by value (at most a few hundred bytes of the 4 KiB parameter space).
struct PoolArgs {
  int64_t C, T, H, W;
  int32_t row0;    // first output row of this launch
  int32_t packed;  // 1: rows are sequences packed along T of item 0, frames [start[i], start[i+1])
  int32_t start[kPoolSeqChunk + 1];
  int32_t nlevels;
  int32_t bins[kPoolMaxLevels];
  int32_t B;  // strips (sum of bins)
  int32_t mode;
};

// Where output row n (of this launch) reads: element offset of channel 0's first frame, frames.
__device__ __forceinline__ void row_frames(const PoolArgs& a, int64_t n, int64_t& base,
                                           int& len) {
  const int64_t HW = a.H * a.W;
  if (a.packed) {
    base = static_cast<int64_t>(a.start[n]) * HW;  // item 0
    len = a.start[n + 1] - a.start[n];
  } else {
    base = (a.row0 + n) * a.C * a.T * HW;
    len = static_cast<int>(a.T);
  }
}

// Rows [r0, r1) of strip j (levels concatenated): adaptive pooling's boundaries, as pooling.h.
__device__ __forceinline__ void strip_rows(const PoolArgs& a, int j, int& r0, int& r1) {
  const int H = static_cast<int>(a.H);
  for (int l = 0; l < a.nlevels; ++l) {
    const int b = a.bins[l];
    if (j < b) {
      r0 = j * H / b;
      r1 = ((j + 1) * H + b - 1) / b;
      return;
    }
    j -= b;
  }
  r0 = r1 = 0;  // not reached for j < B
}

template <typename T>
__global__ void pool_fwd_kernel(const T* __restrict__ x, T* __restrict__ out,
                                int32_t* __restrict__ targ, int32_t* __restrict__ sarg,
                                const PoolArgs a, bool hpp) {
  QGAIT_DYNAMIC_SMEM(float, smem);
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W), B = a.B;
  const int HW = H * W;
  float* z = smem;             // [HW]
  float* rsum = smem + HW;     // [H]
  float* rmax = rsum + H;      // [H]
  int* rarg = reinterpret_cast<int*>(rmax + H);  // [H]
  const int64_t nl = blockIdx.x / a.C, c = blockIdx.x % a.C;
  const int64_t it = (a.row0 + nl) * a.C + c;  // global work item (output row, channel)
  int64_t base;
  int len;
  row_frames(a, nl, base, len);
  const T* src = x + base + c * a.T * HW;
  for (int p = threadIdx.x; p < HW; p += blockDim.x) {
    float m = to_f(src[p]);
    int arg = 0;
    for (int t = 1; t < len; ++t) {
      const float v = to_f(src[static_cast<int64_t>(t) * HW + p]);
      if (beats(v, m)) {
        m = v;
        arg = t;
      }
    }
    if (targ) targ[it * HW + p] = arg;
    if (hpp) z[p] = m;
    else out[it * HW + p] = from_f<T>(m);
  }
  if (!hpp) return;
  __syncthreads();
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    const float* r = z + h * W;
    float s = 0.f, m = r[0];
    int arg = 0;
    for (int w = 0; w < W; ++w) s += r[w];
    for (int w = 1; w < W; ++w)
      if (beats(r[w], m)) {
        m = r[w];
        arg = w;
      }
    rsum[h] = s;
    rmax[h] = m;
    rarg[h] = arg;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < B; j += blockDim.x) {
    int r0, r1;
    strip_rows(a, j, r0, r1);
    float s = 0.f, m = rmax[r0];
    int best = r0;
    for (int h = r0; h < r1; ++h) s += rsum[h];
    for (int h = r0 + 1; h < r1; ++h)
      if (beats(rmax[h], m)) {
        m = rmax[h];
        best = h;
      }
    const float mean = __fdiv_rn(s, static_cast<float>((r1 - r0) * W));
    const float v = a.mode == 0 ? __fadd_rn(mean, m) : (a.mode == 1 ? m : mean);
    out[it * B + j] = from_f<T>(v);
    if (sarg) sarg[it * B + j] = best * W + rarg[best];
  }
}

template <typename T>
__global__ void pool_bwd_kernel(const T* __restrict__ grad, const int32_t* __restrict__ targ,
                                const int32_t* __restrict__ sarg, T* __restrict__ dx,
                                const PoolArgs a, bool hpp) {
  QGAIT_DYNAMIC_SMEM(float, smem);  // hpp only
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W), B = a.B;
  const int HW = H * W;
  float* dz = smem;          // [HW]
  float* rowc = smem + HW;   // [H]
  const int64_t nl = blockIdx.x / a.C, c = blockIdx.x % a.C;
  const int64_t it = (a.row0 + nl) * a.C + c;
  int64_t base;
  int len;
  row_frames(a, nl, base, len);
  T* dst = dx + base + c * a.T * HW;
  if (hpp) {
    const T* g = grad + it * B;
    // each mean term spreads g / (rows * W) over its strip: a per-row constant, summed in
    // strip order
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.f;
      if (a.mode != 1) {
        int j = 0;
        for (int l = 0; l < a.nlevels; ++l) {
          const int b = a.bins[l];
          for (int i = 0; i < b; ++i, ++j) {
            const int r0 = i * H / b, r1 = ((i + 1) * H + b - 1) / b;
            if (h >= r0 && h < r1)
              acc = __fadd_rn(acc, __fdiv_rn(to_f(g[j]), static_cast<float>((r1 - r0) * W)));
          }
        }
      }
      rowc[h] = acc;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < HW; p += blockDim.x) dz[p] = rowc[p / W];
    __syncthreads();
    // each max term adds g at its arg-max; one thread, strip order (several strips of a
    // pyramid can share an arg-max, so the order is fixed for determinism)
    if (a.mode != 2 && threadIdx.x == 0)
      for (int j = 0; j < B; ++j) dz[sarg[it * B + j]] += to_f(g[j]);
    __syncthreads();
  }
  // temporal pooling alone reads its gradient straight from global memory (no shared memory,
  // so no limit on H*W)
  for (int p = threadIdx.x; p < HW; p += blockDim.x) {
    const int arg = targ ? targ[it * HW + p] : 0;
    const float d = hpp ? dz[p] : to_f(grad[it * HW + p]);
    for (int t = 0; t < len; ++t)
      dst[static_cast<int64_t>(t) * HW + p] = from_f<T>(t == arg ? d : 0.f);
  }
}

constexpr int64_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without the attribute
constexpr int64_t kMaxGridX = 0x7fffffffLL;

int64_t smem_bytes(const PoolCall& c, bool backward) {
  if (!c.hpp) return 0;
  return (c.H * c.W + (backward ? 1 : 3) * c.H) * static_cast<int64_t>(sizeof(float));
}

// Raises the kernel's dynamic shared memory limit when it needs more than the default 48 KiB
// (a host-side attribute: no sync, no copy), up to what the device allows.
template <typename K>
cudaError_t allow_smem(K* kernel, int64_t bytes) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (bytes > optin) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Runs launch(args, rows) for every chunk of output rows (packed sequences: kPoolSeqChunk per
// launch, so that their starts fit the arguments; otherwise one launch).
template <typename F>
cudaError_t for_each_launch(const PoolCall& c, F&& launch) {
  PoolArgs a{};
  a.C = c.C;
  a.T = c.T;
  a.H = c.H;
  a.W = c.W;
  a.mode = c.mode;
  a.nlevels = c.hpp ? static_cast<int32_t>(c.nbins) : 0;
  a.B = 0;
  for (int l = 0; l < a.nlevels; ++l) {
    a.bins[l] = static_cast<int32_t>(c.bins[l]);
    a.B += a.bins[l];
  }
  if (c.nseq == 0) {
    a.packed = 0;
    a.row0 = 0;
    return launch(a, c.N);
  }
  a.packed = 1;
  int64_t start = 0;
  for (int64_t s0 = 0; s0 < c.nseq; s0 += kPoolSeqChunk) {
    const int64_t n = c.nseq - s0 < kPoolSeqChunk ? c.nseq - s0 : kPoolSeqChunk;
    a.row0 = static_cast<int32_t>(s0);
    for (int64_t i = 0; i <= n; ++i) {
      a.start[i] = static_cast<int32_t>(start);
      if (i < n) start += c.seqL[s0 + i];
    }
    start = a.start[n];
    const cudaError_t err = launch(a, n);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_fwd(const void* x, void* out, int32_t* targ, int32_t* sarg,
                       const PoolCall& c, cudaStream_t stream) {
  const int64_t smem = smem_bytes(c, false);
  cudaError_t err = allow_smem(pool_fwd_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  return for_each_launch(c, [&](const PoolArgs& a, int64_t rows) {
    QGAIT_LAUNCH(static_cast<unsigned>(rows * c.C), kThreads, static_cast<size_t>(smem), stream,
                 pool_fwd_kernel<T>)(static_cast<const T*>(x), static_cast<T*>(out), targ, sarg,
                                     a, c.hpp);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_bwd(const void* grad, const int32_t* targ, const int32_t* sarg, void* dx,
                       const PoolCall& c, cudaStream_t stream) {
  const int64_t smem = smem_bytes(c, true);
  cudaError_t err = allow_smem(pool_bwd_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  return for_each_launch(c, [&](const PoolArgs& a, int64_t rows) {
    QGAIT_LAUNCH(static_cast<unsigned>(rows * c.C), kThreads, static_cast<size_t>(smem), stream,
                 pool_bwd_kernel<T>)(static_cast<const T*>(grad), targ, sarg,
                                     static_cast<T*>(dx), a, c.hpp);
    return cudaGetLastError();
  });
}

}  // namespace

int64_t pool_smem_bytes(const PoolCall& call, bool backward) { return smem_bytes(call, backward); }

const char* pool_cuda_limit(const PoolCall& c, int64_t smem_optin) {
  if (c.hpp && c.nbins > kPoolMaxLevels)
    return "more than 16 pyramid levels (bins entries) in one call";
  const int64_t rows = c.nseq > 0 ? (c.nseq < kPoolSeqChunk ? c.nseq : kPoolSeqChunk) : c.N;
  if (rows * c.C > kMaxGridX) return "N * C is above the grid limit of 2^31 - 1 blocks";
  if (c.T > 0x7fffffffLL || c.H * c.W > 0x7fffffffLL) return "T or H * W does not fit int32";
  if (smem_bytes(c, false) > smem_optin || smem_bytes(c, true) > smem_optin)
    return "the fused pyramid keeps the H x W map in shared memory, and this map does not fit "
           "one block's";
  return nullptr;
}

cudaError_t pool_forward(const void* x, void* out, int32_t* targ, int32_t* sarg,
                         const PoolCall& call, int dtype, cudaStream_t stream) {
  if (call.N * call.C == 0 || (call.hpp && call.nbins > kPoolMaxLevels))
    return call.N * call.C == 0 ? cudaSuccess : cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_fwd<float>(x, out, targ, sarg, call, stream);
    case 1: return launch_fwd<__half>(x, out, targ, sarg, call, stream);
    case 2: return launch_fwd<__nv_bfloat16>(x, out, targ, sarg, call, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t pool_backward(const void* grad, const int32_t* targ, const int32_t* sarg, void* dx,
                          const PoolCall& call, int dtype, cudaStream_t stream) {
  if (call.N * call.C == 0 || (call.hpp && call.nbins > kPoolMaxLevels))
    return call.N * call.C == 0 ? cudaSuccess : cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_bwd<float>(grad, targ, sarg, dx, call, stream);
    case 1: return launch_bwd<__half>(grad, targ, sarg, dx, call, stream);
    case 2: return launch_bwd<__nv_bfloat16>(grad, targ, sarg, dx, call, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace qgait::cuda

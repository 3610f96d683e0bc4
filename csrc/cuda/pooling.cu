// CUDA temporal pooling + horizontal pyramid pooling (see pooling.cuh for the layout).
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

template <typename T>
__global__ void pool_fwd_kernel(const T* __restrict__ x, T* __restrict__ out,
                                int32_t* __restrict__ targ, int32_t* __restrict__ sarg,
                                const int64_t* __restrict__ seq_base,
                                const int32_t* __restrict__ seq_len,
                                const int32_t* __restrict__ row0, const int32_t* __restrict__ row1,
                                int64_t C, int64_t cstride, int H, int W, int B, int mode,
                                bool hpp) {
  QGAIT_DYNAMIC_SMEM(float, smem);
  const int HW = H * W;
  float* z = smem;             // [HW]
  float* rsum = smem + HW;     // [H]
  float* rmax = rsum + H;      // [H]
  int* rarg = reinterpret_cast<int*>(rmax + H);  // [H]
  const int64_t it = blockIdx.x;
  const int64_t n = it / C, c = it % C;
  const T* src = x + seq_base[n] + c * cstride;
  const int len = seq_len[n];
  for (int p = threadIdx.x; p < HW; p += blockDim.x) {
    float m = to_f(src[p]);
    int a = 0;
    for (int t = 1; t < len; ++t) {
      const float v = to_f(src[static_cast<int64_t>(t) * HW + p]);
      if (beats(v, m)) {
        m = v;
        a = t;
      }
    }
    if (targ) targ[it * HW + p] = a;
    if (hpp) z[p] = m;
    else out[it * HW + p] = from_f<T>(m);
  }
  if (!hpp) return;
  __syncthreads();
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    const float* r = z + h * W;
    float s = 0.f, m = r[0];
    int a = 0;
    for (int w = 0; w < W; ++w) s += r[w];
    for (int w = 1; w < W; ++w)
      if (beats(r[w], m)) {
        m = r[w];
        a = w;
      }
    rsum[h] = s;
    rmax[h] = m;
    rarg[h] = a;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < B; j += blockDim.x) {
    const int a = row0[j], b = row1[j];
    float s = 0.f, m = rmax[a];
    int best = a;
    for (int h = a; h < b; ++h) s += rsum[h];
    for (int h = a + 1; h < b; ++h)
      if (beats(rmax[h], m)) {
        m = rmax[h];
        best = h;
      }
    const float mean = s / static_cast<float>((b - a) * W);
    const float v = mode == 0 ? mean + m : (mode == 1 ? m : mean);
    out[it * B + j] = from_f<T>(v);
    if (sarg) sarg[it * B + j] = best * W + rarg[best];
  }
}

template <typename T>
__global__ void pool_bwd_kernel(const T* __restrict__ grad, const int32_t* __restrict__ targ,
                                const int32_t* __restrict__ sarg, T* __restrict__ dx,
                                const int64_t* __restrict__ seq_base,
                                const int32_t* __restrict__ seq_len,
                                const int32_t* __restrict__ row0, const int32_t* __restrict__ row1,
                                int64_t C, int64_t cstride, int H, int W, int B, int mode,
                                bool hpp) {
  QGAIT_DYNAMIC_SMEM(float, smem);
  const int HW = H * W;
  float* dz = smem;          // [HW]
  float* rowc = smem + HW;   // [H]
  const int64_t it = blockIdx.x;
  const int64_t n = it / C, c = it % C;
  T* dst = dx + seq_base[n] + c * cstride;
  const int len = seq_len[n];
  if (hpp) {
    const T* g = grad + it * B;
    // each mean term spreads g / (rows * W) over its strip: a per-row constant, summed in
    // strip order
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.f;
      if (mode != 1)
        for (int j = 0; j < B; ++j)
          if (h >= row0[j] && h < row1[j])
            acc += to_f(g[j]) / static_cast<float>((row1[j] - row0[j]) * W);
      rowc[h] = acc;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < HW; p += blockDim.x) dz[p] = rowc[p / W];
    __syncthreads();
    // each max term adds g at its arg-max; one thread, strip order (several strips of a
    // pyramid can share an arg-max, so the order is fixed for determinism)
    if (mode != 2 && threadIdx.x == 0)
      for (int j = 0; j < B; ++j) dz[sarg[it * B + j]] += to_f(g[j]);
    __syncthreads();
  } else {
    for (int p = threadIdx.x; p < HW; p += blockDim.x) dz[p] = to_f(grad[it * HW + p]);
    __syncthreads();
  }
  for (int p = threadIdx.x; p < HW; p += blockDim.x) {
    const int a = targ ? targ[it * HW + p] : 0;
    const float d = dz[p];
    for (int t = 0; t < len; ++t)
      dst[static_cast<int64_t>(t) * HW + p] = from_f<T>(t == a ? d : 0.f);
  }
}

template <typename T>
cudaError_t launch_fwd(const void* x, void* out, int32_t* targ, int32_t* sarg,
                       const int64_t* seq_base, const int32_t* seq_len, const int32_t* row0,
                       const int32_t* row1, int64_t n_out, int64_t C, int64_t cstride,
                       int64_t H, int64_t W, int64_t B, int mode, bool hpp,
                       cudaStream_t stream) {
  const size_t smem = hpp ? (H * W + 3 * H) * sizeof(float) : 0;
  QGAIT_LAUNCH(static_cast<unsigned>(n_out * C), kThreads, smem, stream, pool_fwd_kernel<T>)(
      static_cast<const T*>(x), static_cast<T*>(out), targ, sarg, seq_base, seq_len, row0, row1,
      C, cstride, static_cast<int>(H), static_cast<int>(W), static_cast<int>(B), mode, hpp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* grad, const int32_t* targ, const int32_t* sarg, void* dx,
                       const int64_t* seq_base, const int32_t* seq_len, const int32_t* row0,
                       const int32_t* row1, int64_t n_out, int64_t C, int64_t cstride,
                       int64_t H, int64_t W, int64_t B, int mode, bool hpp,
                       cudaStream_t stream) {
  const size_t smem = (H * W + H) * sizeof(float);
  QGAIT_LAUNCH(static_cast<unsigned>(n_out * C), kThreads, smem, stream, pool_bwd_kernel<T>)(
      static_cast<const T*>(grad), targ, sarg, static_cast<T*>(dx), seq_base, seq_len, row0,
      row1, C, cstride, static_cast<int>(H), static_cast<int>(W), static_cast<int>(B), mode,
      hpp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pool_forward(const void* x, void* out, int32_t* targ, int32_t* sarg,
                         const int64_t* seq_base, const int32_t* seq_len, const int32_t* row0,
                         const int32_t* row1, int64_t n_out, int64_t C, int64_t cstride,
                         int64_t H, int64_t W, int64_t B, int mode, bool hpp, int dtype,
                         cudaStream_t stream) {
  if (n_out * C == 0) return cudaSuccess;
  if (H * W > kPoolMaxHW || n_out * C > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_fwd<float>(x, out, targ, sarg, seq_base, seq_len, row0, row1, n_out, C,
                                     cstride, H, W, B, mode, hpp, stream);
    case 1: return launch_fwd<__half>(x, out, targ, sarg, seq_base, seq_len, row0, row1, n_out, C,
                                      cstride, H, W, B, mode, hpp, stream);
    case 2: return launch_fwd<__nv_bfloat16>(x, out, targ, sarg, seq_base, seq_len, row0, row1,
                                             n_out, C, cstride, H, W, B, mode, hpp, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t pool_backward(const void* grad, const int32_t* targ, const int32_t* sarg, void* dx,
                          const int64_t* seq_base, const int32_t* seq_len, const int32_t* row0,
                          const int32_t* row1, int64_t n_out, int64_t C, int64_t cstride,
                          int64_t H, int64_t W, int64_t B, int mode, bool hpp, int dtype,
                          cudaStream_t stream) {
  if (n_out * C == 0) return cudaSuccess;
  if (H * W > kPoolMaxHW || n_out * C > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_bwd<float>(grad, targ, sarg, dx, seq_base, seq_len, row0, row1, n_out,
                                     C, cstride, H, W, B, mode, hpp, stream);
    case 1: return launch_bwd<__half>(grad, targ, sarg, dx, seq_base, seq_len, row0, row1, n_out,
                                      C, cstride, H, W, B, mode, hpp, stream);
    case 2: return launch_bwd<__nv_bfloat16>(grad, targ, sarg, dx, seq_base, seq_len, row0, row1,
                                             n_out, C, cstride, H, W, B, mode, hpp, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace qgait::cuda

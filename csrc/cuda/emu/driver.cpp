// Test driver of the CUDA kernels: a small program, linked with the .cu files, that runs their
// launchers on buffers read from a file and writes the results back. tests/cuda_emu.py writes
// the requests and reads the answers; a separate process keeps sanitizer runtimes, aborts and
// device asserts away from pytest. Built two ways:
//  * as host C++ with -DQGAIT_CUDA_EMU (the CPU emulation, emu/cuda_emu.h): buffers are host
//    heap blocks;
//  * with nvcc, against the real CUDA runtime: buffers are device memory (cudaMalloc), copied
//    in before and out after each request, which ends with cudaDeviceSynchronize. The same
//    tests then compare a GPU's results (QGAIT_EMU_DRIVER=cuda, tests/test_cuda_emu.py).
//
//   driver IN OUT     IN: requests until EOF; OUT: one answer per request.
// Request: u32 name length, name; u32 nbuf, per buffer {u32 kind (0 null, 1 input, 2 output),
// u32 misalign (bytes past a 16-byte boundary), u64 nbytes, bytes}; u32 nint, i64[nint];
// u32 ndbl, f64[ndbl]. Answer: i32 cudaError_t, then every output buffer's bytes in order.
// Each buffer is its own allocation of exactly nbytes (after the misalignment), so ASan sees
// any access past its end; scratch / workspace the launchers need is filled with garbage.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/packed_conv3d.cuh"
#include "cuda/pooling.cuh"
#include "cuda/soft_fake_quant.cuh"

namespace {

struct Buf {
  uint32_t kind = 0, misalign = 0;
  uint64_t nbytes = 0;
  std::vector<unsigned char> host;  // what the request sent / the answer returns
  bool host_answer = false;         // a host-only request wrote `host` itself
  void* base = nullptr;             // the kernels' allocation
  unsigned char* ptr = nullptr;     // base + misalign
};

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "emu driver: %s\n", what);
  std::exit(3);
}

void read_exact(FILE* f, void* p, size_t n) {
  if (n && std::fread(p, 1, n, f) != n) fail("truncated request");
}

template <class T>
T rd(FILE* f) {
  T v;
  read_exact(f, &v, sizeof v);
  return v;
}

// Memory the kernels read and write: host heap blocks (emulation) or device memory.
#ifdef QGAIT_CUDA_EMU
void* dev_alloc(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, 256, n ? n : 1) != 0) fail("out of memory");
  return p;
}
void dev_free(void* p) { std::free(p); }
void to_dev(void* d, const void* h, size_t n) { std::memcpy(d, h, n); }
void to_host(void* h, const void* d, size_t n) { std::memcpy(h, d, n); }
void dev_fill_ff(void* d, size_t n) { std::memset(d, 0xFF, n); }
cudaError_t finish() { return cudaSuccess; }  // launches are synchronous
void reset_device() { qgait_emu::reset_device(); }
void check_device() {}
#else
void* dev_alloc(size_t n) {
  void* p = nullptr;
  if (cudaMalloc(&p, n ? n : 1) != cudaSuccess) fail("cudaMalloc failed");
  return p;
}
void dev_free(void* p) { cudaFree(p); }
void to_dev(void* d, const void* h, size_t n) {
  if (n) cudaMemcpy(d, h, n, cudaMemcpyHostToDevice);
}
void to_host(void* h, const void* d, size_t n) {
  if (n) cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost);
}
void dev_fill_ff(void* d, size_t n) { cudaMemset(d, 0xFF, n); }
cudaError_t finish() { return cudaDeviceSynchronize(); }
void reset_device() { cudaDeviceReset(); }  // after a device-side assert: a fresh context
void check_device() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::fprintf(stderr, "emu driver: no CUDA device\n");
    std::exit(4);
  }
}
#endif

void* garbage(size_t n) {
  void* p = dev_alloc(n);
  dev_fill_ff(p, n);  // NaN floats, -1 ints
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) fail("usage: driver IN OUT");
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) fail("cannot open the request / answer file");
  check_device();
  uint32_t nlen;
  while (std::fread(&nlen, 4, 1, in) == 1) {
    std::string name(nlen, '\0');
    read_exact(in, name.data(), nlen);
    std::vector<Buf> b(rd<uint32_t>(in));
    for (Buf& x : b) {
      x.kind = rd<uint32_t>(in);
      x.misalign = rd<uint32_t>(in);
      x.nbytes = rd<uint64_t>(in);
      if (x.kind == 0) continue;
      x.host.resize(x.nbytes);
      read_exact(in, x.host.data(), x.nbytes);
      x.base = dev_alloc(x.misalign + x.nbytes);
      x.ptr = static_cast<unsigned char*>(x.base) + x.misalign;
      to_dev(x.ptr, x.host.data(), x.nbytes);
    }
    std::vector<int64_t> I(rd<uint32_t>(in));
    read_exact(in, I.data(), I.size() * 8);
    std::vector<double> D(rd<uint32_t>(in));
    read_exact(in, D.data(), D.size() * 8);
    auto P = [&](size_t i) -> void* { return b.at(i).ptr; };
    auto need = [&](size_t nb, size_t ni, size_t nd) {
      if (b.size() != nb || I.size() != ni || D.size() != nd)
        fail(("bad arguments to " + name).c_str());
    };
    cudaError_t rc = cudaSuccess;
    if (name == "sfq_fwd") {
      // x, y, scale | dtype, outer, C, inner, soft, k0 | qn, qp, k, tanh_scale, g_scale
      need(3, 6, 5);
      const qgait::cuda::SfqConsts c{float(D[0]), float(D[1]), float(D[2]), float(D[3]),
                                     float(D[4]), I[4] != 0, I[5] != 0};
      rc = qgait::cuda::sfq_forward_cuda(P(0), P(1), static_cast<const float*>(P(2)), int(I[0]),
                                         I[1], I[2], I[3], c, nullptr);
    } else if (name == "sfq_bwd") {
      // gy, x, dx|null, ds|null, scale | dtype, outer, C, inner, soft, k0 | qn..g_scale, gamma
      need(5, 6, 6);
      const qgait::cuda::SfqConsts c{float(D[0]), float(D[1]), float(D[2]), float(D[3]),
                                     float(D[4]), I[4] != 0, I[5] != 0};
      const int64_t nws = qgait::cuda::sfq_backward_workspace(I[1], I[2], I[3]);
      float* ws = static_cast<float*>(garbage(size_t(nws) * sizeof(float)));
      rc = qgait::cuda::sfq_backward_cuda(P(0), P(1), P(2), static_cast<float*>(P(3)), ws,
                                          static_cast<const float*>(P(4)), int(I[0]), I[1], I[2],
                                          I[3], c, D[5], nullptr);
      dev_free(ws);
    } else if (name == "pool_fwd" || name == "pool_bwd" || name == "pool_limit") {
      // pool_fwd: x, out, targ|null, sarg|null; pool_bwd: grad, targ|null, sarg|null, dx;
      // pool_limit: reason (out, 256 bytes)
      // | N, C, T, H, W, mode, hpp, dtype (pool_limit: smem_optin), nseq, seqL..., nbins, bins...
      if (I.size() < 10) fail("bad arguments to pool_*");
      qgait::cuda::PoolCall c{};
      c.N = I[0]; c.C = I[1]; c.T = I[2]; c.H = I[3]; c.W = I[4];
      c.mode = int(I[5]);
      c.hpp = I[6] != 0;
      c.nseq = I[8];
      c.seqL = c.nseq ? &I[9] : nullptr;
      c.nbins = I.at(size_t(9 + c.nseq));
      c.bins = c.nbins ? &I[size_t(10 + c.nseq)] : nullptr;
      if (I.size() != size_t(10 + c.nseq + c.nbins)) fail("bad seqL / bins in pool_*");
      if (name == "pool_fwd") {
        need(4, I.size(), 0);
        rc = qgait::cuda::pool_forward(P(0), P(1), static_cast<int32_t*>(P(2)),
                                       static_cast<int32_t*>(P(3)), c, int(I[7]), nullptr);
      } else if (name == "pool_bwd") {
        need(4, I.size(), 0);
        rc = qgait::cuda::pool_backward(P(0), static_cast<const int32_t*>(P(1)),
                                        static_cast<const int32_t*>(P(2)), P(3), c, int(I[7]),
                                        nullptr);
      } else {
        need(1, I.size(), 0);
        const char* why = qgait::cuda::pool_cuda_limit(c, I[7]);
        std::snprintf(reinterpret_cast<char*>(b[0].host.data()), b[0].nbytes, "%s",
                      why ? why : "");
        b[0].host_answer = true;
      }
    } else if (name == "conv" || name == "conv_scratch") {
      // x, x_scale, w, w_scale, bias|null, bn_scale|null, bn_shift|null, out_scale|null, y
      // | x_dtype, sx[5], N, C, T, H, W, in_qn, in_qp, w_bits, Co, kT, kH, kW, sT, sH, sW,
      //   pT, pH, pW, dT, dH, dW, To, Ho, Wo, act, out_mode, out_qn, out_qp | slope
      need(9, 34, 1);
      qgait::PackedConvParams p{};
      int k = 0;
      p.x = P(0);
      p.x_dtype = int(I[k++]);
      for (int i = 0; i < 5; ++i) p.sx[i] = I[k++];
      p.N = int(I[k++]); p.C = int(I[k++]); p.T = int(I[k++]); p.H = int(I[k++]);
      p.W = int(I[k++]);
      p.x_scale = static_cast<const float*>(P(1));
      p.in_qn = int(I[k++]); p.in_qp = int(I[k++]);
      p.w = static_cast<const uint8_t*>(P(2));
      p.w_bits = int(I[k++]);
      p.Co = int(I[k++]); p.kT = int(I[k++]); p.kH = int(I[k++]); p.kW = int(I[k++]);
      p.sT = int(I[k++]); p.sH = int(I[k++]); p.sW = int(I[k++]);
      p.pT = int(I[k++]); p.pH = int(I[k++]); p.pW = int(I[k++]);
      p.dT = int(I[k++]); p.dH = int(I[k++]); p.dW = int(I[k++]);
      p.To = int(I[k++]); p.Ho = int(I[k++]); p.Wo = int(I[k++]);
      p.w_scale = static_cast<const float*>(P(3));
      p.bias = static_cast<const float*>(P(4));
      p.bn_scale = static_cast<const float*>(P(5));
      p.bn_shift = static_cast<const float*>(P(6));
      p.act = int(I[k++]);
      p.slope = float(D[0]);
      p.out_mode = int(I[k++]);
      p.out_scale = static_cast<const float*>(P(7));
      p.out_qn = int(I[k++]); p.out_qp = int(I[k++]);
      p.y = P(8);
      const size_t nscratch = qgait::packed_conv3d_scratch_bytes(p);
      if (name == "conv_scratch") {  // only the scratch size (into y, an int64)
        const int64_t v = int64_t(nscratch);
        std::memcpy(b[8].host.data(), &v, sizeof v);
        b[8].host_answer = true;
      } else {
        p.scratch = garbage(nscratch);
        rc = qgait::packed_conv3d_launch(p, nullptr);
        const cudaError_t done = finish();
        if (rc == cudaSuccess) rc = done;
        dev_free(p.scratch);
      }
#ifdef QGAIT_CUDA_EMU
    } else if (name == "cvt16") {
      // the emulation's own 16-bit conversions: f32 in, bits16 in | half bits, bf16 bits,
      // half -> f32, bf16 -> f32 out
      need(6, 0, 0);
      const float* f = static_cast<const float*>(P(0));
      const uint16_t* h = static_cast<const uint16_t*>(P(1));
      for (size_t i = 0; i < b[0].nbytes / 4; ++i) {
        static_cast<uint16_t*>(P(2))[i] = __float2half_rn(f[i]).__x;
        static_cast<uint16_t*>(P(3))[i] = __float2bfloat16_rn(f[i]).__x;
      }
      for (size_t i = 0; i < b[1].nbytes / 2; ++i) {
        static_cast<float*>(P(4))[i] = __half2float(__half{h[i]});
        static_cast<float*>(P(5))[i] = __bfloat162float(__nv_bfloat16{h[i]});
      }
#endif
    } else if (name == "reset") {
      reset_device();
    } else {
      fail(("unknown request " + name).c_str());
    }
    const cudaError_t done = finish();  // asynchronous errors (a device-side assert)
    if (rc == cudaSuccess) rc = done;
    const int32_t code = int32_t(rc);
    std::fwrite(&code, 4, 1, out);
    for (Buf& x : b) {
      if (x.kind == 2) {
        if (!x.host_answer) to_host(x.host.data(), x.ptr, x.nbytes);
        std::fwrite(x.host.data(), 1, x.nbytes, out);
      }
      if (x.base) dev_free(x.base);
    }
    std::fflush(out);
  }
  std::fclose(out);
  return 0;
}

// Inner loops of the pooling ops over one contiguous frame of n = H*W fp32 values. Included once
// per ISA by pooling.cpp (see vec.h); no include guard on purpose. The tails (n % W) run the
// same comparisons in scalar code, so every ISA gives bit-identical results.

// z = max(z, x) over one frame. With idx: idx = t where x > z (strictly: the first frame wins
// ties), idx holding frame numbers as exact small floats so that one vector select updates it.
static void tp_frame(const float* x, float* z, float* idx, float t, int64_t n) {
  constexpr int W = Vec::W;
  int64_t i = 0;
  if (idx == nullptr) {
    for (; i + W <= n; i += W) vstore(z + i, vmax(vload(z + i), vload(x + i)));
    for (; i < n; ++i) z[i] = x[i] > z[i] ? x[i] : z[i];
    return;
  }
  const Vec tv = vset1(t);
  for (; i + W <= n; i += W) {
    const Vec xv = vload(x + i), zv = vload(z + i);
    const Mask m = vgt(xv, zv);
    vstore(z + i, select(m, xv, zv));
    vstore(idx + i, select(m, tv, vload(idx + i)));
  }
  for (; i < n; ++i)
    if (x[i] > z[i]) {
      z[i] = x[i];
      idx[i] = t;
    }
}

// Streaming (non-temporal) stores for dx: it is as large as x and never read back by this op,
// so writing around the cache avoids reading every line first (read-for-ownership), which
// otherwise doubles the memory traffic of the backward. Needs W*4-byte aligned addresses.
#if QGAIT_VEC == 512
static inline void vstream(float* p, Vec a) { _mm512_stream_ps(p, a.v); }
static inline void stream_fence() { _mm_sfence(); }
#elif QGAIT_VEC == 256
static inline void vstream(float* p, Vec a) { _mm256_stream_ps(p, a.v); }
static inline void stream_fence() { _mm_sfence(); }
#else
static inline void vstream(float* p, Vec a) { *p = a.v; }
static inline void stream_fence() {}
#endif

// One frame of the backward: dst = (idx == t) ? dz : 0 (idx as exact floats, see tp_frame).
// stream: non-temporal stores (call stream_fence() before the data is read elsewhere).
static void tp_scatter_frame(float* dst, const float* dz, const float* idx, float t, int64_t n,
                             bool stream) {
  constexpr int W = Vec::W;
  const Vec tv = vset1(t), zero = vset1(0.f);
  int64_t i = 0;
  if (stream)  // scalar head up to the first aligned vector
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) % (W * sizeof(float))) != 0; ++i)
      dst[i] = idx[i] == t ? dz[i] : 0.f;
  for (; i + W <= n; i += W) {
    const Vec iv = vload(idx + i);
    const Mask ne = mor(vlt(iv, tv), vgt(iv, tv));
    const Vec v = select(ne, zero, vload(dz + i));
    if (stream) vstream(dst + i, v); else vstore(dst + i, v);
  }
  for (; i < n; ++i) dst[i] = idx[i] == t ? dz[i] : 0.f;
}

// dst = src (one frame of dx when T = 1), with the same store policy.
static void copy_frame(float* dst, const float* src, int64_t n, bool stream) {
  constexpr int W = Vec::W;
  int64_t i = 0;
  if (stream)
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) % (W * sizeof(float))) != 0; ++i)
      dst[i] = src[i];
  for (; i + W <= n; i += W) {
    if (stream) vstream(dst + i, vload(src + i)); else vstore(dst + i, vload(src + i));
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Inner loops of the pooling ops over one contiguous frame of n = H*W fp32 values. Included once
// per ISA by pooling.cpp (see vec.h); no include guard on purpose. The tails (n % W) run the
// same comparisons in scalar code, so every ISA gives bit-identical results.

// z = max(z, x) over one frame under torch.max's rule (vbeats in vec.h: the first NaN wins and
// stays, ties keep the first). With idx: idx = t where x wins, idx holding frame numbers as exact
// small floats so that one vector select updates it.
static void tp_frame(const float* x, float* z, float* idx, float t, int64_t n) {
  constexpr int W = Vec::W;
  int64_t i = 0;
  if (idx == nullptr) {
    for (; i + W <= n; i += W) vstore(z + i, vmaxnan(vload(z + i), vload(x + i)));
    for (; i < n; ++i) z[i] = beats(x[i], z[i]) ? x[i] : z[i];
    return;
  }
  const Vec tv = vset1(t);
  for (; i + W <= n; i += W) {
    const Vec xv = vload(x + i), zv = vload(z + i);
    const Mask m = vbeats(xv, zv);
    vstore(z + i, select(m, xv, zv));
    vstore(idx + i, select(m, tv, vload(idx + i)));
  }
  for (; i < n; ++i)
    if (beats(x[i], z[i])) {
      z[i] = x[i];
      idx[i] = t;
    }
}

// Temporal max of a whole fp32 slab x [len, n] (len >= 1) into z [n] (and idx, if given), with
// the running maxima of U vectors held in registers across all frames: one load per element
// instead of tp_frame's load + load + store per element and frame. Per element it performs the
// same operations as the frame-by-frame loop (frame 0 copied, then tp_frame's vector or tail
// step for every later frame), so the two give bit-identical results.
template <int U, bool IDX>
static inline void tp_chunk(const float* x, int64_t len, int64_t n, float* z, float* idx) {
  constexpr int W = Vec::W;
  Vec zr[U], ir[U];
  // Without indices the loop is MAXPS alone, as cheap as a max can be, and NaN is tracked on
  // the side: one ordered-check per pair of vectors (mord2), folded into a per-lane flag; only
  // a chunk that saw a NaN is taken again with vmaxnan (MAXPS drops a NaN x). Per frame that is
  // 1.5 instructions per vector instead of vmaxnan's 2.
  Mask ok[(U + 1) / 2];
  for (int u = 0; u < U; ++u) {
    zr[u] = vload(x + u * W);
    if constexpr (IDX) ir[u] = vset1(0.f);
  }
  constexpr auto pair = [](int u) { return u + 1 < U ? u + 1 : u; };  // an odd U's last: itself
  for (int u = 0; u < U; u += 2) ok[u / 2] = mord2(mtrue(), zr[u], zr[pair(u)]);
  for (int64_t t = 1; t < len; ++t) {
    const float* p = x + t * n;
    if constexpr (IDX) {
      const Vec tv = vset1(static_cast<float>(t));
      for (int u = 0; u < U; ++u) {
        const Vec xv = vload(p + u * W);
        const Mask m = vbeats(xv, zr[u]);
        zr[u] = select(m, xv, zr[u]);
        ir[u] = select(m, tv, ir[u]);
      }
    } else {
      for (int u = 0; u < U; u += 2) {  // a pair at a time: two live loads, not U
        const int v = pair(u);
        const Vec a = vload(p + u * W), b = vload(p + v * W);
        zr[u] = vmax(a, zr[u]);  // MAXPS(x, z): ties (and +0 after -0) keep z, the first
        if (v != u) zr[v] = vmax(b, zr[v]);
        ok[u / 2] = mord2(ok[u / 2], a, b);
      }
    }
  }
  if constexpr (!IDX) {
    bool clean = true;
    for (int u = 0; u < U; u += 2) clean = clean && mall(ok[u / 2]);
    if (!clean) {  // a NaN somewhere in the chunk (rare): again under torch.max's rule
      for (int u = 0; u < U; ++u) zr[u] = vload(x + u * W);
      for (int64_t t = 1; t < len; ++t)
        for (int u = 0; u < U; ++u) zr[u] = vmaxnan(zr[u], vload(x + t * n + u * W));
    }
  }
  for (int u = 0; u < U; ++u) {
    vstore(z + u * W, zr[u]);
    if constexpr (IDX) vstore(idx + u * W, ir[u]);
  }
}

template <bool IDX>
static void tp_slab_impl(const float* x, int64_t len, int64_t n, int64_t stride, float* z,
                         float* idx) {
  constexpr int W = Vec::W;
  // Up to kMax vectors in one chunk, so that a frame is read front to back; wider frames go in
  // chunks of U (leaving room for the indices and temporaries in the 32 zmm / 16 ymm).
  constexpr int U = W >= 16 ? 8 : 4;
  constexpr int kMax = W >= 16 ? (IDX ? 12 : 16) : (IDX ? 6 : 12);
  using ChunkFn = void (*)(const float*, int64_t, int64_t, float*, float*);
  static constexpr ChunkFn kChunk[17] = {
      nullptr,            tp_chunk<1, IDX>,  tp_chunk<2, IDX>,  tp_chunk<3, IDX>,
      tp_chunk<4, IDX>,   tp_chunk<5, IDX>,  tp_chunk<6, IDX>,  tp_chunk<7, IDX>,
      tp_chunk<8, IDX>,   tp_chunk<9, IDX>,  tp_chunk<10, IDX>, tp_chunk<11, IDX>,
      tp_chunk<12, IDX>,  tp_chunk<13, IDX>, tp_chunk<14, IDX>, tp_chunk<15, IDX>,
      tp_chunk<16, IDX>};
  const int64_t nv = n / W;
  int64_t v = 0;
  if (nv > kMax)
    for (; v + U <= nv; v += U)
      tp_chunk<U, IDX>(x + v * W, len, stride, z + v * W, IDX ? idx + v * W : nullptr);
  if (v < nv) kChunk[nv - v](x + v * W, len, stride, z + v * W, IDX ? idx + v * W : nullptr);
  for (int64_t i = nv * W; i < n; ++i) {  // tail elements: tp_frame's scalar step
    float m = x[i], a = 0.f;
    for (int64_t t = 1; t < len; ++t) {
      const float xv = x[t * stride + i];
      if (beats(xv, m)) {
        m = xv;
        a = static_cast<float>(t);
      }
    }
    z[i] = m;
    if (IDX) idx[i] = a;
  }
}

// n elements of each frame, frames `stride` elements apart (a part of a wider slab)
static void tp_slab(const float* x, int64_t len, int64_t n, int64_t stride, float* z,
                    float* idx) {
  if (idx) tp_slab_impl<true>(x, len, n, stride, z, idx);
  else tp_slab_impl<false>(x, len, n, stride, z, nullptr);
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

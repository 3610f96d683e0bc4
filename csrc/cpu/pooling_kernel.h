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

// One frame of the backward: dst = (idx == t) ? dz : 0 (idx as exact floats, see tp_frame).
static void tp_scatter_frame(float* dst, const float* dz, const float* idx, float t, int64_t n) {
  constexpr int W = Vec::W;
  const Vec tv = vset1(t), zero = vset1(0.f);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec iv = vload(idx + i);
    const Mask ne = mor(vlt(iv, tv), vgt(iv, tv));
    vstore(dst + i, select(ne, zero, vload(dz + i)));
  }
  for (; i < n; ++i) dst[i] = idx[i] == t ? dz[i] : 0.f;
}

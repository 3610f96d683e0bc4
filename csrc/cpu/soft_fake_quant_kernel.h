// Soft fake-quant kernel bodies over contiguous fp32 spans. Included once per ISA by
// soft_fake_quant.cpp (see vec.h); no include guard on purpose.
//
// PE = false: one step for the whole span (sp[0], rp[0]); PE = true: a step per element
// (sp[i], rp[i]), used when the quantized axis is the innermost one.

template <bool PE>
static void sfq_fwd(const float* x, float* y, int64_t n, const float* sp, const float* rp,
                    const qgait::SfqParams& P) {
  constexpr int W = Vec::W;
  const Vec qn = vset1(P.qn), qp = vset1(P.qp), half = vset1(0.5f);
  const Vec kk = vset1(P.k), tscale = vset1(P.tanh_scale);
  auto body = [&](const float* xi, float* yi, Vec s, Vec r) {
    // c = clamp(x * r, qn, qp); max/min order keeps NaN (vec.h)
    const Vec c = vmin(qp, vmax(qn, vload(xi) * r));
    Vec q;
    if (!P.soft) {
      q = vrint(c);
    } else if (P.k0) {
      q = c;
    } else {
      const Vec fl = vfloor(c);
      const Vec t = vtanh(kk * (c - fl - half));
      q = vfma(t, tscale, fl + half);
    }
    // + 0 turns -0 into +0, as torch computes (round(v) + zp) - zp: bit-identical results
    vstore(yi, q * s + vset1(0.f));
  };
  Vec s = vset1(sp[0]), r = vset1(rp[0]);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    if (PE) {
      s = vload(sp + i);
      r = vload(rp + i);
    }
    body(x + i, y + i, s, r);
  }
  if (i < n) {  // tail: run the same vector code on a padded copy
    float xb[W] = {0}, yb[W], sb[W], rb[W];
    const int64_t m = n - i;
    for (int64_t j = 0; j < W; ++j) {
      sb[j] = PE ? (j < m ? sp[i + j] : 1.f) : sp[0];
      rb[j] = PE ? (j < m ? rp[i + j] : 1.f) : rp[0];
      if (j < m) xb[j] = x[i + j];
    }
    body(xb, yb, vload(sb), vload(rb));
    for (int64_t j = 0; j < m; ++j) y[i + j] = yb[j];
  }
}

// One pass of the backward: writes dx (when dx != nullptr) and reduces the step-gradient
// terms. PE = false returns their sum over the span; PE = true adds them into acc[i].
//   inside (qn <= v <= qp): dx = gy * g,  term = gy * (q - v g)
//   below / above:          dx = 0,       term = gy * qn / gy * qp
// NaN v counts as inside, so NaN reaches dx and the step gradient.
template <bool PE>
static float sfq_bwd(const float* gy, const float* x, float* dx, int64_t n, const float* sp,
                     const float* rp, float* acc, const qgait::SfqParams& P) {
  constexpr int W = Vec::W;
  const Vec qn = vset1(P.qn), qp = vset1(P.qp), half = vset1(0.5f), one = vset1(1.f);
  const Vec kk = vset1(P.k), tscale = vset1(P.tanh_scale), gscale = vset1(P.g_scale);
  const Vec zero = vset1(0.f);
  Vec sum = zero;
  auto body = [&](const float* gi, const float* xi, float* dxi, float* acci, Vec r) {
    const Vec g_y = vload(gi);
    const Vec v = vload(xi) * r;
    const Mask below = vlt(v, qn), above = vgt(v, qp);
    const Vec c = vmin(qp, vmax(qn, v));
    Vec g, q;
    if (P.k0) {
      g = one;
      q = P.soft ? c : vrint(c);
    } else {
      const Vec fl = vfloor(c);
      const Vec t = vtanh(kk * (c - fl - half));
      g = gscale * vfma(vset1(0.f) - t, t, one);  // 1 - t^2, one rounding
      q = P.soft ? vfma(t, tscale, fl + half) : vrint(c);
    }
    if (dxi != nullptr) vstore(dxi, select(mor(below, above), zero, g_y * g));
    const Vec term = g_y * select(below, qn, select(above, qp, vfma(vset1(0.f) - v, g, q)));
    if (PE) {
      vstore(acci, vload(acci) + term);
    } else {
      sum = sum + term;
    }
  };
  Vec r = vset1(rp[0]);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    if (PE) r = vload(rp + i);
    body(gy + i, x + i, dx ? dx + i : nullptr, PE ? acc + i : nullptr, r);
  }
  if (i < n) {  // tail on a padded copy; padding has gy = 0, so its terms are 0
    float gb[W] = {0}, xb[W] = {0}, db[W], ab[W] = {0}, rb[W];
    const int64_t m = n - i;
    for (int64_t j = 0; j < W; ++j) {
      rb[j] = PE ? (j < m ? rp[i + j] : 1.f) : rp[0];
      if (j < m) {
        gb[j] = gy[i + j];
        xb[j] = x[i + j];
      }
    }
    body(gb, xb, dx ? db : nullptr, ab, vload(rb));
    for (int64_t j = 0; j < m; ++j) {
      if (dx) dx[i + j] = db[j];
      if (PE) acc[i + j] += ab[j];
    }
  }
  (void)sp;
  return vsum(sum);
}

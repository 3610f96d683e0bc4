// Loop bodies of the code-domain inference ops (codes.cpp). Included once per ISA inside its own
// namespace and `#pragma GCC target` region, like soft_fake_quant_kernel.h: plain loops that
// gcc vectorizes for the region's ISA. No include guard on purpose.

// dst[c] = max(dst[c], src[c]) for c < n: pmaxub / pmaxsb on whole vectors.
template <typename T>
static void max_into(T* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = src[c] > dst[c] ? src[c] : dst[c];
}

// One output row of a max pooling over channels-last codes: `src` points at the window's
// first input pixel of output pixel 0; pixel steps are in elements.
template <typename T>
static void pool_row(const T* src, T* dst, int64_t wo, int64_t C, const int64_t* kk,
                     int64_t step_t, int64_t step_h, int64_t step_w, int64_t stride_w) {
  for (int64_t x = 0; x < wo; ++x, dst += C, src += stride_w * step_w) {
    bool first = true;
    for (int64_t a = 0; a < kk[0]; ++a)
      for (int64_t b = 0; b < kk[1]; ++b)
        for (int64_t c = 0; c < kk[2]; ++c) {
          const T* s = src + a * step_t + b * step_h + c * step_w;
          if (first) {
            for (int64_t i = 0; i < C; ++i) dst[i] = s[i];
            first = false;
          } else {
            max_into(dst, s, C);
          }
        }
  }
}

// The part FCs on codes: for each output channel o of one part,
// y[o * ystride] = float(sum_i codes[i] * w[o, i]) * s * ws[o]. Products are at most
// 255 * 128 in magnitude, so the int32 sums are exact for up to 65,793 inputs.
static void part_fc(const int16_t* __restrict codes, const int8_t* __restrict w, int64_t cin,
                    int64_t cout, float s, const float* __restrict ws, float* y,
                    int64_t ystride) {
  for (int64_t o = 0; o < cout; ++o) {
    const int8_t* __restrict wo = w + o * cin;
    int32_t acc = 0;
    for (int64_t i = 0; i < cin; ++i) acc += int32_t(codes[i]) * int32_t(wo[i]);
    y[o * ystride] = static_cast<float>(acc) * s * ws[o];
  }
}

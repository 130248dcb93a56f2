// Plain C++ reference path of the fused pixel shuffle + LayerNorm (CPU, float/double).
// Correct, not fast: one row at a time, statistics in double. See pixel_shuffle_ln.h
// for the index map.
#include "pixel_shuffle_ln.h"

#include <cmath>
#include <vector>

namespace longvita {
namespace {

// Offset (in elements) of the C-vector that fills slot s of output row `row`.
inline int64_t source_offset(int64_t row, int64_t s, int64_t h, int64_t C, int64_t inv) {
  const int64_t w_out = h / inv;
  const int64_t n_out = w_out * w_out;
  const int64_t tile = row / n_out, r = row % n_out;
  const int64_t i = r / w_out, j = r % w_out;
  const int64_t m = s / inv, k = s % inv;
  return (tile * h * h + (inv * i + m) * h + inv * j + k) * C;
}

}  // namespace

template <typename T>
void pixel_shuffle_ln_fwd_cpu(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd,
                              int64_t tiles, int64_t h, int64_t C, int64_t inv, double eps) {
  const int64_t slots = inv * inv, n = slots * C;
  const int64_t rows = tiles * (h / inv) * (h / inv);
  for (int64_t row = 0; row < rows; ++row) {
    double sum = 0.0;
    for (int64_t s = 0; s < slots; ++s) {
      const T* src = x + source_offset(row, s, h, C, inv);
      for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(src[c]);
    }
    const double mu = sum / static_cast<double>(n);
    double sq = 0.0;
    for (int64_t s = 0; s < slots; ++s) {
      const T* src = x + source_offset(row, s, h, C, inv);
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(src[c]) - mu;
        sq += d * d;
      }
    }
    const double rs = 1.0 / std::sqrt(sq / static_cast<double>(n) + eps);
    T* out = y + row * n;
    for (int64_t s = 0; s < slots; ++s) {
      const T* src = x + source_offset(row, s, h, C, inv);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = s * C + c;
        double v = (static_cast<double>(src[c]) - mu) * rs * static_cast<double>(w[e]);
        if (b != nullptr) v += static_cast<double>(b[e]);
        out[e] = static_cast<T>(v);
      }
    }
    mean[row] = static_cast<T>(mu);
    rstd[row] = static_cast<T>(rs);
  }
}

template <typename T>
void pixel_shuffle_ln_bwd_cpu(const T* dy, const T* x, const T* w, const T* mean, const T* rstd,
                              T* dx, T* dw, T* db, int64_t tiles, int64_t h, int64_t C, int64_t inv) {
  const int64_t slots = inv * inv, n = slots * C;
  const int64_t rows = tiles * (h / inv) * (h / inv);
  std::vector<double> dw_acc(n, 0.0), db_acc(n, 0.0), xhat(n), g(n);
  for (int64_t row = 0; row < rows; ++row) {
    const double mu = static_cast<double>(mean[row]), rs = static_cast<double>(rstd[row]);
    const T* dyr = dy + row * n;
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t s = 0; s < slots; ++s) {
      const T* src = x + source_offset(row, s, h, C, inv);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = s * C + c;
        const double d = static_cast<double>(dyr[e]);
        xhat[e] = (static_cast<double>(src[c]) - mu) * rs;
        g[e] = d * static_cast<double>(w[e]);
        sum_g += g[e];
        sum_gx += g[e] * xhat[e];
        dw_acc[e] += d * xhat[e];
        db_acc[e] += d;
      }
    }
    const double c1 = sum_gx / static_cast<double>(n), c2 = sum_g / static_cast<double>(n);
    for (int64_t s = 0; s < slots; ++s) {
      T* dst = dx + source_offset(row, s, h, C, inv);  // the inverse map: one writer per token
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = s * C + c;
        dst[c] = static_cast<T>((g[e] - (xhat[e] * c1 + c2)) * rs);
      }
    }
  }
  for (int64_t e = 0; e < n; ++e) {
    dw[e] = static_cast<T>(dw_acc[e]);
    if (db != nullptr) db[e] = static_cast<T>(db_acc[e]);
  }
}

template void pixel_shuffle_ln_fwd_cpu<float>(const float*, const float*, const float*, float*, float*,
                                               float*, int64_t, int64_t, int64_t, int64_t, double);
template void pixel_shuffle_ln_fwd_cpu<double>(const double*, const double*, const double*, double*,
                                                double*, double*, int64_t, int64_t, int64_t, int64_t,
                                                double);
template void pixel_shuffle_ln_bwd_cpu<float>(const float*, const float*, const float*, const float*,
                                               const float*, float*, float*, float*, int64_t, int64_t,
                                               int64_t, int64_t);
template void pixel_shuffle_ln_bwd_cpu<double>(const double*, const double*, const double*,
                                                const double*, const double*, double*, double*, double*,
                                                int64_t, int64_t, int64_t, int64_t);

}  // namespace longvita

// CUDA kernels of the fused pixel shuffle + LayerNorm, forward and backward.
// CUDA headers only (see docs/architecture.md, "Native code"): raw pointers, sizes, a stream.
// The index map is described in pixel_shuffle_ln.h.
//
// Forward: one block per output row; each thread keeps EPT elements of the row in
// registers (element e = threadIdx.x + k*blockDim.x, so loads within a slot are
// coalesced), two block reductions give mean and variance (two-pass, fp32), and the
// normalised row is written once in the input dtype.
// Backward: num_blocks blocks stride over the rows; per row the same layout,
// dx = rstd * (g - mean(g) - xhat * mean(g*xhat)) with g = dy*w is stored to the
// row's source tokens (one writer per element, no atomics); dw/db accumulate in
// registers and are written once per block as fp32 partial sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "pixel_shuffle_ln.h"

namespace longvita {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the block; every thread gets the result. `shared` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < n_warps ? shared[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Element offset into x of element e (= s*C + c) of output row `row`.
__device__ __forceinline__ int64_t source_index(int64_t row, int64_t e, int64_t h, int64_t w_out,
                                                int64_t n_out, int64_t C, int64_t inv) {
  const int64_t tile = row / n_out, r = row - tile * n_out;
  const int64_t i = r / w_out, j = r - i * w_out;
  const int64_t s = e / C, c = e - s * C;
  const int64_t m = s / inv, k = s - m * inv;
  return (tile * h * h + (inv * i + m) * h + inv * j + k) * C + c;
}

template <typename T, int EPT>
__global__ void __launch_bounds__(512) ps_ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                 T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                 int64_t h, int64_t C, int64_t inv, float eps) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const int64_t w_out = h / inv, n_out = w_out * w_out, n = inv * inv * C;
  float v[EPT];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    v[k] = e < n ? to_float(x[source_index(row, e, h, w_out, n_out, C, inv)]) : 0.f;
    sum += v[k];
  }
  const float mean = block_sum(sum, shared) / static_cast<float>(n);
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    const float d = e < n ? v[k] - mean : 0.f;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq, shared) / static_cast<float>(n) + eps);
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (e < n) {
      float out = (v[k] - mean) * rstd * to_float(w[e]);
      if (b != nullptr) out += to_float(b[e]);
      y[row * n + e] = from_float<T>(out);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, int EPT>
__global__ void __launch_bounds__(512) ps_ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                 T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part,
                                 int64_t n_rows, int64_t h, int64_t C, int64_t inv) {
  __shared__ float shared[32];
  const int64_t w_out = h / inv, n_out = w_out * w_out, n = inv * inv * C;
  float wv[EPT], dw_acc[EPT], db_acc[EPT], xhat[EPT], g[EPT];
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    wv[k] = e < n ? to_float(w[e]) : 0.f;
    dw_acc[k] = 0.f;
    db_acc[k] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const float mu = mean[row], rs = rstd[row];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < EPT; ++k) {
      const int64_t e = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (e < n) {
        const float d = to_float(dy[row * n + e]);
        xhat[k] = (to_float(x[source_index(row, e, h, w_out, n_out, C, inv)]) - mu) * rs;
        g[k] = d * wv[k];
        dw_acc[k] += d * xhat[k];
        db_acc[k] += d;
      } else {
        xhat[k] = 0.f;
        g[k] = 0.f;
      }
      sum_g += g[k];
      sum_gx += g[k] * xhat[k];
    }
    const float c1 = block_sum(sum_gx, shared) / static_cast<float>(n);
    const float c2 = block_sum(sum_g, shared) / static_cast<float>(n);
#pragma unroll
    for (int k = 0; k < EPT; ++k) {
      const int64_t e = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (e < n) dx[source_index(row, e, h, w_out, n_out, C, inv)] = from_float<T>((g[k] - (xhat[k] * c1 + c2)) * rs);
    }
  }
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (e < n) {
      dw_part[static_cast<int64_t>(blockIdx.x) * n + e] = dw_acc[k];
      if (db_part != nullptr) db_part[static_cast<int64_t>(blockIdx.x) * n + e] = db_acc[k];
    }
  }
}

// Threads per block (<= 512, the kernels' launch bounds) and elements per thread for a
// row of n elements (n <= kPsMaxRow = 512 * 32).
struct LaunchShape {
  int threads;
  int ept;
};

LaunchShape launch_shape(int64_t n) {
  int threads = 128;
  while (threads < 512 && n > static_cast<int64_t>(threads) * 8) threads *= 2;
  int ept = 1;
  while (static_cast<int64_t>(threads) * ept < n) ept *= 2;
  return {threads, ept};
}

template <typename T>
cudaError_t fwd_typed(const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                      int64_t tiles, int64_t h, int64_t C, int64_t inv, float eps, cudaStream_t stream) {
  const int64_t n = inv * inv * C, rows = tiles * (h / inv) * (h / inv);
  if (rows == 0) return cudaSuccess;
  if (n > kPsMaxRow || rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  const LaunchShape ls = launch_shape(n);
  const T* xp = static_cast<const T*>(x);
  const T* wp = static_cast<const T*>(w);
  const T* bp = static_cast<const T*>(b);
  T* yp = static_cast<T*>(y);
  const dim3 grid(static_cast<unsigned>(rows)), block(ls.threads);
  switch (ls.ept) {
#define LONGVITA_PS_FWD(E) \
  case E:                  \
    ps_ln_fwd_kernel<T, E><<<grid, block, 0, stream>>>(xp, wp, bp, yp, mean, rstd, h, C, inv, eps); break;
    LONGVITA_PS_FWD(1) LONGVITA_PS_FWD(2) LONGVITA_PS_FWD(4) LONGVITA_PS_FWD(8) LONGVITA_PS_FWD(16)
    LONGVITA_PS_FWD(32)
#undef LONGVITA_PS_FWD
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                      void* dx, float* dw_part, float* db_part, int num_blocks, int64_t tiles, int64_t h,
                      int64_t C, int64_t inv, cudaStream_t stream) {
  const int64_t n = inv * inv * C, rows = tiles * (h / inv) * (h / inv);
  if (n > kPsMaxRow || num_blocks < 1) return cudaErrorInvalidValue;
  const LaunchShape ls = launch_shape(n);
  const T* dyp = static_cast<const T*>(dy);
  const T* xp = static_cast<const T*>(x);
  const T* wp = static_cast<const T*>(w);
  T* dxp = static_cast<T*>(dx);
  const dim3 grid(num_blocks), block(ls.threads);
  switch (ls.ept) {
#define LONGVITA_PS_BWD(E)                                                                                \
  case E:                                                                                                 \
    ps_ln_bwd_kernel<T, E><<<grid, block, 0, stream>>>(dyp, xp, wp, mean, rstd, dxp, dw_part, db_part, rows, \
                                                       h, C, inv);                                        \
    break;
    LONGVITA_PS_BWD(1) LONGVITA_PS_BWD(2) LONGVITA_PS_BWD(4) LONGVITA_PS_BWD(8) LONGVITA_PS_BWD(16)
    LONGVITA_PS_BWD(32)
#undef LONGVITA_PS_BWD
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pixel_shuffle_ln_fwd_cuda(int dtype, const void* x, const void* w, const void* b, void* y,
                                      float* mean, float* rstd, int64_t tiles, int64_t h, int64_t C,
                                      int64_t inv, float eps, cudaStream_t stream) {
  switch (dtype) {
    case kPsFloat32: return fwd_typed<float>(x, w, b, y, mean, rstd, tiles, h, C, inv, eps, stream);
    case kPsFloat16: return fwd_typed<__half>(x, w, b, y, mean, rstd, tiles, h, C, inv, eps, stream);
    case kPsBFloat16: return fwd_typed<__nv_bfloat16>(x, w, b, y, mean, rstd, tiles, h, C, inv, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t pixel_shuffle_ln_bwd_cuda(int dtype, const void* dy, const void* x, const void* w,
                                      const float* mean, const float* rstd, void* dx, float* dw_part,
                                      float* db_part, int num_blocks, int64_t tiles, int64_t h,
                                      int64_t C, int64_t inv, cudaStream_t stream) {
  switch (dtype) {
    case kPsFloat32:
      return bwd_typed<float>(dy, x, w, mean, rstd, dx, dw_part, db_part, num_blocks, tiles, h, C, inv, stream);
    case kPsFloat16:
      return bwd_typed<__half>(dy, x, w, mean, rstd, dx, dw_part, db_part, num_blocks, tiles, h, C, inv, stream);
    case kPsBFloat16:
      return bwd_typed<__nv_bfloat16>(dy, x, w, mean, rstd, dx, dw_part, db_part, num_blocks, tiles, h, C, inv,
                                      stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace longvita

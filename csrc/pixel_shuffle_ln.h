// Fused pixel shuffle + LayerNorm: declarations of the CPU reference path
// (csrc/cpu/pixel_shuffle_ln.cpp) and, for CUDA builds, the CUDA launchers
// (csrc/pixel_shuffle_ln.cu). Raw pointers and sizes only; no torch here.
//
// Index map (scale 1/inv): x is (tiles, h*h, C) seen as a (tiles, h, h, C) grid. Output
// row r = i*(h/inv) + j of a tile holds inv*inv slots of C channels; slot s = m*inv + k
// comes from source token (inv*i + m)*h + (inv*j + k). Every source token has exactly
// one (row, slot), so the backward writes dx with plain stores.
#pragma once

#include <cstdint>

namespace longvita {

// y (rows, inv*inv*C) = LayerNorm(shuffled x) * w (+ b); mean/rstd (rows,), rows = tiles*h*h/inv^2.
// b may be null. T = float or double; statistics accumulate in double.
template <typename T>
void pixel_shuffle_ln_fwd_cpu(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd,
                              int64_t tiles, int64_t h, int64_t C, int64_t inv, double eps);

// dx (tiles, h*h, C), dw (inv*inv*C), db (inv*inv*C, may be null) from dy (rows, inv*inv*C).
template <typename T>
void pixel_shuffle_ln_bwd_cpu(const T* dy, const T* x, const T* w, const T* mean, const T* rstd,
                              T* dx, T* dw, T* db, int64_t tiles, int64_t h, int64_t C, int64_t inv);

}  // namespace longvita

#if defined(LONGVITA_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>

namespace longvita {

enum PsDtype : int { kPsFloat32 = 0, kPsFloat16 = 1, kPsBFloat16 = 2 };

// Largest inv*inv*C the CUDA kernels handle (registers hold one row per block).
constexpr int64_t kPsMaxRow = 16384;
// Backward blocks per multiprocessor: each block loops over many rows and keeps one
// (inv^2*C) partial sum of dweight/dbias, so a few resident blocks per SM hide memory
// latency while the partial-sum buffer (blocks x inv^2*C fp32) stays small.
constexpr int64_t kPsBwdBlocksPerSm = 4;

// One block per output row. mean/rstd are fp32. b may be null.
cudaError_t pixel_shuffle_ln_fwd_cuda(int dtype, const void* x, const void* w, const void* b, void* y,
                                      float* mean, float* rstd, int64_t tiles, int64_t h, int64_t C,
                                      int64_t inv, float eps, cudaStream_t stream);

// num_blocks blocks stride over the rows; block k writes dw_part[k, :] (and db_part[k, :]
// when db_part is not null), fp32 partial sums the caller reduces over k.
cudaError_t pixel_shuffle_ln_bwd_cuda(int dtype, const void* dy, const void* x, const void* w,
                                      const float* mean, const float* rstd, void* dx, float* dw_part,
                                      float* db_part, int num_blocks, int64_t tiles, int64_t h,
                                      int64_t C, int64_t inv, cudaStream_t stream);

}  // namespace longvita
#endif

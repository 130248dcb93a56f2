// The one binding file of longvita._C: it includes torch, checks every tensor
// (TORCH_CHECK naming the argument) and calls the kernels, which take raw pointers,
// sizes and (for CUDA) a stream. CPU reference paths live in csrc/cpu/*.cpp; CUDA
// kernels in csrc/*.cu include only CUDA's own headers (see docs/architecture.md, "Native code").
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "pixel_shuffle_ln.h"

#ifdef LONGVITA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace longvita {

// What this build of the extension contains; `python -m longvita info` prints it.
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef LONGVITA_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["built_with_torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  return info;
}

// ---- fused pixel shuffle + LayerNorm (pixel_shuffle_ln.h) ------------------------------

namespace {

void check_ps_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     int64_t inv) {
  TORCH_CHECK(inv >= 1, "pixel_shuffle_ln: inv (1/scale_factor) must be >= 1, got ", inv);
  TORCH_CHECK(x.dim() == 3, "pixel_shuffle_ln: x must be 3-D (tiles, h*h, C), got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "pixel_shuffle_ln: x must be contiguous");
  const int64_t n_tok = x.size(1);
  int64_t h = 0;
  while ((h + 1) * (h + 1) <= n_tok) ++h;
  TORCH_CHECK(h * h == n_tok, "pixel_shuffle_ln: x.size(1) must be a perfect square h*h, got ", n_tok);
  TORCH_CHECK(h % inv == 0, "pixel_shuffle_ln: x's grid side h = ", h, " must be divisible by inv = ", inv);
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == inv * inv * x.size(2),
              "pixel_shuffle_ln: weight must be 1-D with inv*inv*C = ", inv * inv * x.size(2), " elements, got shape ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "pixel_shuffle_ln: weight must be contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "pixel_shuffle_ln: weight must have x's dtype");
  TORCH_CHECK(weight.device() == x.device(), "pixel_shuffle_ln: weight must be on x's device");
  if (bias.has_value()) {
    const at::Tensor& b = bias.value();
    TORCH_CHECK(b.sizes() == weight.sizes(), "pixel_shuffle_ln: bias must have weight's shape ", weight.sizes(),
                ", got ", b.sizes());
    TORCH_CHECK(b.is_contiguous(), "pixel_shuffle_ln: bias must be contiguous");
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "pixel_shuffle_ln: bias must have x's dtype");
    TORCH_CHECK(b.device() == x.device(), "pixel_shuffle_ln: bias must be on x's device");
  }
}

int64_t grid_side(const at::Tensor& x) {
  int64_t h = 0;
  while ((h + 1) * (h + 1) <= x.size(1)) ++h;
  return h;
}

#ifdef LONGVITA_WITH_CUDA
int ps_cuda_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return kPsFloat32;
    case at::kHalf: return kPsFloat16;
    case at::kBFloat16: return kPsBFloat16;
    default: TORCH_CHECK(false, "pixel_shuffle_ln (CUDA): x must be float32/float16/bfloat16, got ", x.scalar_type());
  }
  return -1;
}
#endif

}  // namespace

// Forward: (y (tiles, h*h/inv^2, inv^2*C), mean (rows,), rstd (rows,)).
// CPU (float32/float64): statistics in x's dtype. CUDA: statistics in fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_ln_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                                    const c10::optional<at::Tensor>& bias,
                                                                    int64_t inv, double eps) {
  check_ps_inputs(x, weight, bias, inv);
  const int64_t tiles = x.size(0), h = grid_side(x), C = x.size(2);
  const int64_t rows = tiles * (h / inv) * (h / inv), n = inv * inv * C;
  at::Tensor y = at::empty({tiles, (h / inv) * (h / inv), n}, x.options());
  if (x.is_cpu()) {
    at::Tensor mean = at::empty({rows}, x.options());
    at::Tensor rstd = at::empty({rows}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pixel_shuffle_ln_fwd_cpu", [&] {
      pixel_shuffle_ln_fwd_cpu<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                         bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                                         y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                                         tiles, h, C, inv, eps);
    });
    return {y, mean, rstd};
  }
#ifdef LONGVITA_WITH_CUDA
  TORCH_CHECK(x.is_cuda(), "pixel_shuffle_ln: x must be a CPU or CUDA tensor");
  TORCH_CHECK(n <= kPsMaxRow, "pixel_shuffle_ln (CUDA): inv*inv*C must be <= ", kPsMaxRow, ", got ", n);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  const cudaError_t err = pixel_shuffle_ln_fwd_cuda(
      ps_cuda_dtype(x), x.data_ptr(), weight.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(),
      mean.data_ptr<float>(), rstd.data_ptr<float>(), tiles, h, C, inv, static_cast<float>(eps),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "pixel_shuffle_ln_fwd_cuda failed: ", cudaGetErrorString(err));
  return {y, mean, rstd};
#else
  TORCH_CHECK(false, "pixel_shuffle_ln: x is on ", x.device(), " but longvita._C was built without CUDA");
#endif
}

// Backward: (dx (tiles, h*h, C), dweight, dbias (an empty tensor when has_bias is false)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_ln_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& mean,
                                                                    const at::Tensor& rstd, int64_t inv,
                                                                    bool has_bias) {
  check_ps_inputs(x, weight, c10::nullopt, inv);
  const int64_t tiles = x.size(0), h = grid_side(x), C = x.size(2);
  const int64_t rows = tiles * (h / inv) * (h / inv), n = inv * inv * C;
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == tiles && dy.size(1) == (h / inv) * (h / inv) && dy.size(2) == n,
              "pixel_shuffle_ln_bwd: dy must have shape (", tiles, ", ", (h / inv) * (h / inv), ", ", n, "), got ",
              dy.sizes());
  TORCH_CHECK(dy.is_contiguous(), "pixel_shuffle_ln_bwd: dy must be contiguous");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "pixel_shuffle_ln_bwd: dy must have x's dtype");
  TORCH_CHECK(dy.device() == x.device(), "pixel_shuffle_ln_bwd: dy must be on x's device");
  const auto stat_dtype = x.is_cpu() ? x.scalar_type() : at::kFloat;
  for (const auto& pair : {std::make_pair("mean", &mean), std::make_pair("rstd", &rstd)}) {
    const at::Tensor& t = *pair.second;
    TORCH_CHECK(t.dim() == 1 && t.numel() == rows, "pixel_shuffle_ln_bwd: ", pair.first, " must have shape (", rows,
                ",), got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "pixel_shuffle_ln_bwd: ", pair.first, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == stat_dtype, "pixel_shuffle_ln_bwd: ", pair.first, " must be ", stat_dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "pixel_shuffle_ln_bwd: ", pair.first, " must be on x's device");
  }
  at::Tensor dx = at::empty_like(x);
  if (x.is_cpu()) {
    at::Tensor dw = at::empty_like(weight);
    at::Tensor db = has_bias ? at::empty_like(weight) : at::empty({0}, weight.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pixel_shuffle_ln_bwd_cpu", [&] {
      pixel_shuffle_ln_bwd_cpu<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                         mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                                         dw.data_ptr<scalar_t>(), has_bias ? db.data_ptr<scalar_t>() : nullptr, tiles,
                                         h, C, inv);
    });
    return {dx, dw, db};
  }
#ifdef LONGVITA_WITH_CUDA
  TORCH_CHECK(x.is_cuda(), "pixel_shuffle_ln_bwd: x must be a CPU or CUDA tensor");
  TORCH_CHECK(n <= kPsMaxRow, "pixel_shuffle_ln (CUDA): inv*inv*C must be <= ", kPsMaxRow, ", got ", n);
  const c10::cuda::CUDAGuard guard(x.device());
  if (rows == 0) {
    at::Tensor zero = at::zeros_like(weight);
    return {dx, zero, has_bias ? at::zeros_like(weight) : at::empty({0}, weight.options())};
  }
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()) == cudaSuccess,
              "pixel_shuffle_ln_bwd: cannot read the multiprocessor count");
  const int num_blocks = static_cast<int>(std::min<int64_t>(rows, kPsBwdBlocksPerSm * static_cast<int64_t>(sms)));
  at::Tensor dw_part = at::empty({num_blocks, n}, x.options().dtype(at::kFloat));
  at::Tensor db_part = has_bias ? at::empty({num_blocks, n}, x.options().dtype(at::kFloat)) : at::Tensor();
  const cudaError_t err = pixel_shuffle_ln_bwd_cuda(
      ps_cuda_dtype(x), dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
      dx.data_ptr(), dw_part.data_ptr<float>(), has_bias ? db_part.data_ptr<float>() : nullptr, num_blocks, tiles, h,
      C, inv, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "pixel_shuffle_ln_bwd_cuda failed: ", cudaGetErrorString(err));
  at::Tensor dw = dw_part.sum(0).to(weight.scalar_type());
  at::Tensor db = has_bias ? db_part.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {dx, dw, db};
#else
  TORCH_CHECK(false, "pixel_shuffle_ln_bwd: x is on ", x.device(), " but longvita._C was built without CUDA");
#endif
}

}  // namespace longvita

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "longvita native kernels (CPU reference paths; CUDA kernels when built with CUDA)";
  m.def("build_info", &longvita::build_info, "What this build of longvita._C contains");
  m.def("pixel_shuffle_ln_fwd", &longvita::pixel_shuffle_ln_fwd,
        "Fused pixel shuffle + LayerNorm forward: (y, mean, rstd)", pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("inv"), pybind11::arg("eps"));
  m.def("pixel_shuffle_ln_bwd", &longvita::pixel_shuffle_ln_bwd,
        "Fused pixel shuffle + LayerNorm backward: (dx, dweight, dbias)", pybind11::arg("dy"), pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("inv"),
        pybind11::arg("has_bias"));
}

// The one binding file of longvita._C: it includes torch, checks every tensor
// (TORCH_CHECK naming the argument) and calls the kernels, which take raw pointers,
// sizes and (for CUDA) a stream. CPU reference paths live in csrc/cpu/*.cpp; CUDA
// kernels in csrc/*.cu include only CUDA's own headers (see DESIGN.md, "Native code").
#include <torch/extension.h>

#include <string>

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

}  // namespace longvita

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "longvita native kernels (CPU reference paths; CUDA kernels when built with CUDA)";
  m.def("build_info", &longvita::build_info, "What this build of longvita._C contains");
}

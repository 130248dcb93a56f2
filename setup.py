"""Build longvita's native extension `longvita._C`.

The C++ part (csrc/binding.cpp + csrc/cpu/*.cpp: plain C++ reference paths) builds on
every machine, so the binding code is exercised everywhere. The CUDA kernels
(csrc/*.cu) join it only when torch is a CUDA build and nvcc is found, or when forced.

Environment switches (read at build time):
  LONGVITA_FORCE_CUDA=1     build the CUDA kernels even if torch.cuda is not available
                            (e.g. on a build machine without a GPU but with CUDA torch)
  LONGVITA_SKIP_CUDA=1      never build the CUDA kernels
  LONGVITA_SKIP_EXT=1       build no extension at all (pure Python install; every
                            kernel then falls back to Triton or the torch reference)
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "9.0a" (Hopper); e.g. "8.0;9.0a"
  NVCC_THREADS              nvcc --threads, default 4
  MAX_JOBS                  parallel compile jobs (ninja), default: torch's choice

Install torch first, then `pip install --no-build-isolation .`: an isolated build
would download a CUDA torch of its own.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _torch_libstdcxx() -> list[str]:
    """The shared libstdc++ this process (which has imported torch) has loaded, as a link
    input, so longvita._C uses that one. Some toolchains link libstdc++ statically by
    default (the GPU image's /opt/gcc g++ did: its _C.so had no libstdc++ dependency).
    A static copy inside _C.so, with -Bsymbolic-functions, runs its own iostream code on
    the shared library's locale data: the first TORCH_CHECK message that formatted a
    number crashed the process (SIGSEGV in std::ostream::_M_insert<long>) instead of
    raising. Listed before the compiler's own -lstdc++, the shared library wins."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libstdc++.so" in line}
    except OSError:  # not Linux
        return []
    paths = sorted(p for p in paths if os.path.isfile(p))
    return paths[:1]


def _extensions():
    if _flag("LONGVITA_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = ["csrc/binding.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std here: torch's build_ext adds the standard its own headers need (C++17 for
    # torch 2.11, C++20 for newer releases); forcing one breaks the other.
    cxx_flags = ["-O3"]
    link_args = _torch_libstdcxx()
    nvcc_found = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    want_cuda = not _flag("LONGVITA_SKIP_CUDA") and (
        _flag("LONGVITA_FORCE_CUDA") or (torch.version.cuda is not None and nvcc_found)
    )
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
        nvcc_flags = [
            "-O3",
            "--use_fast_math",
            "-lineinfo",
            f"--threads={os.environ.get('NVCC_THREADS', '4')}",
        ]
        ext = CUDAExtension(
            "longvita._C",
            sources=cpu_sources + sorted(glob.glob("csrc/*.cu")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("LONGVITA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_args,
        )
    else:
        ext = CppExtension(
            "longvita._C",
            sources=cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

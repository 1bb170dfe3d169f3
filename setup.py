"""Build lightkv_ext: a CPU extension everywhere, plus the CUDA kernels where torch has CUDA.

Knobs (environment):
  FORCE_CUDA=1         build the CUDA kernels even if no GPU is visible (needs a CUDA torch + nvcc)
  LIGHTKV_FORCE_CPU=1  build the CPU extension only
  TORCH_CUDA_ARCH_LIST e.g. "8.0;9.0" (torch's own knob; default: the visible GPUs, else 8.0;9.0)
  MAX_JOBS             parallel compile jobs for ninja (torch's own knob)
  DEBUG=1              -O0 -g
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("LIGHTKV_FORCE_CPU", "0") == "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.environ.get("FORCE_CUDA", "0") == "1" or torch.cuda.is_available()


def _extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = [os.path.join("csrc", "lightkv.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = opt + ["-fopenmp"]  # the C++ standard is the one torch builds with
    kwargs = dict(
        name="lightkv_ext._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if not _want_cuda():
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        sources=sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        **kwargs,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

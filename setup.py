"""Builds the fused kernels in csrc/ into reuse_core._C; all metadata lives in pyproject.toml.

CUDA kernels are compiled whenever torch was built with CUDA and nvcc is found, GPU or not.
Environment knobs: REUSE_CORE_NO_CUDA=1 (CPU only), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"
when no GPU is visible), CUDA_HOME (default: /usr/local/cuda, else the folder above nvcc's bin/),
MAX_JOBS (default: the CPU count). REUSE_CORE_SKIP_EXT=1 installs the package without
building the extension: the Makefile uses it for the editable install and then builds the
extension in place with `setup.py build_ext --inplace`, which keeps build/ for ninja, so a
change to one kernel recompiles one file.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        # Resolve symlinks: /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc.
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


# torch.utils.cpp_extension reads CUDA_HOME when imported, so settle it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

want_cuda = os.environ.get("REUSE_CORE_NO_CUDA", "0") not in ("1", "true", "yes")
has_nvcc = bool(_cuda_home) and os.path.exists(os.path.join(_cuda_home, "bin", "nvcc"))
build_cuda = want_cuda and torch.version.cuda is not None and has_nvcc

if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native GPU") if build_cuda else ""

cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))

# -fopenmp: at::parallel_for is inline, and runs serially in code compiled without it.
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
define_macros = [("REUSE_CUDA_ARCHS", f'"{archs}"')]

if build_cuda:
    # The CUDA toolkit may lack headers that ATen's CUDA headers pull in (cuBLAS, cuSPARSE);
    # pip's nvidia wheels next to torch carry them.
    for sp in sys.path:
        for inc in glob.glob(os.path.join(sp, "nvidia", "cu*", "include")):
            nvcc_flags.append(f"-I{inc}")
    define_macros.append(("REUSE_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "reuse_core._C",
        cpp_sources + cuda_sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "reuse_core._C",
        cpp_sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

print(
    f"reuse-core: building reuse_core._C with backends: CPU"
    + (f" + CUDA {torch.version.cuda} (nvcc in {_cuda_home}) for archs {archs}" if build_cuda else "")
    + ("" if build_cuda else f" (CUDA skipped: {'REUSE_CORE_NO_CUDA set' if not want_cuda else 'torch has no CUDA' if torch.version.cuda is None else 'nvcc not found'})"),
    file=sys.stderr,
)

if os.environ.get("REUSE_CORE_SKIP_EXT", "0") in ("1", "true", "yes"):
    print("reuse-core: REUSE_CORE_SKIP_EXT set, not building reuse_core._C", file=sys.stderr)
    setup()
else:
    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})

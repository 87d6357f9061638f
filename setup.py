"""Build kmax_m2f and its ``kmax_m2f._C`` extension (the MSDeformAttn kernels).

The C++ CPU kernel is always built. The CUDA kernel is added when a CUDA toolkit (nvcc) is found,
or when ``FORCE_CUDA=1``; ``FORCE_CUDA=0`` disables it. ``TORCH_CUDA_ARCH_LIST`` picks the target
architectures (default when no GPU is visible: "8.0;9.0+PTX").
"""
import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("kmax_m2f") / "layers" / "ms_deform_attn" / "csrc"


def _find_cuda_home() -> str | None:
    """The CUDA toolkit to compile with: $CUDA_HOME / $CUDA_PATH, then the nvcc on PATH, then
    /usr/local/cuda*. torch's own guess follows the nvcc wrapper to /usr/local, which is wrong on
    machines where the real toolkit lives in /usr/local/cuda-X.Y."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and Path(home, "bin", "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda.h").exists():
            return str(home)
    for candidate in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if Path(candidate, "bin", "nvcc").exists():
            return str(Path(candidate).resolve())
    return None


def _want_cuda(cuda_home: str | None) -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    if force == "1":
        if cuda_home is None:
            sys.exit(
                "setup.py: FORCE_CUDA=1 but no CUDA toolkit was found. Install one (nvcc) and set "
                "CUDA_HOME to it, or unset FORCE_CUDA to build the CPU kernel only."
            )
        return True
    return cuda_home is not None


def _nvidia_wheel_include_dirs() -> list[str]:
    """Headers that a bare toolkit may lack (cusparse.h, cublas) but torch's nvidia-* wheels ship;
    ATen/cuda/CUDAContext.h includes them."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(dirs))


def get_extensions():
    import torch
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in (ROOT / CSRC).glob("*.cpp")) + sorted(
        str(p) for p in (ROOT / CSRC / "cpu").glob("*.cpp")
    )
    sources = [os.path.relpath(s, ROOT) for s in sources]
    if not sources:
        return []
    define_macros = []
    # No -std flag: torch's BuildExtension adds the standard its headers need (torch 2.14's
    # require C++20, so a fixed -std=c++17 breaks the build).
    extra_compile_args = {"cxx": ["-O3"]}
    extra_link_args = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs serially.
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    extension = cpp_extension.CppExtension
    include_dirs = [str(ROOT / CSRC)]

    cuda_home = _find_cuda_home()
    if _want_cuda(cuda_home):
        os.environ["CUDA_HOME"] = cuda_home
        # torch reads CUDA_HOME when cpp_extension is imported; re-point it at the toolkit found.
        cpp_extension.CUDA_HOME = cuda_home
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Without a visible GPU torch cannot guess the architectures; build the common ones,
            # plus PTX that newer GPUs compile at load time.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        extension = cpp_extension.CUDAExtension
        sources += [os.path.relpath(p, ROOT) for p in sorted((ROOT / CSRC / "cuda").glob("*.cu"))]
        define_macros.append(("WITH_CUDA", None))
        include_dirs += _nvidia_wheel_include_dirs()
        extra_compile_args["nvcc"] = [
            "-O3",
            "-DCUDA_HAS_FP16=1",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ]
        print(f"setup.py: building the CUDA kernel with {cuda_home} for "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    else:
        print("setup.py: no CUDA toolkit found (or FORCE_CUDA=0): building the CPU kernel only",
              file=sys.stderr)

    return [
        extension(
            "kmax_m2f._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


setup(
    name="kmax_m2f",
    version="0.1.0",
    description="Mask2Former, kMaX-DeepLab, StructToken, ReSTR and LOCA as one detectron2 extension",
    python_requires=">=3.10",
    packages=find_packages(include=["kmax_m2f", "kmax_m2f.*"]),
    package_data={"kmax_m2f": ["layers/ms_deform_attn/csrc/**/*"]},
    ext_modules=get_extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)

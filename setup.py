"""Build ladder_kernels and its compiled extension ladder_kernels._C.

C++ CPU kernels (csrc/cpu) are always built, into ladder_kernels._C. CUDA kernels (csrc/cuda) are built
into ladder_kernels._C_cuda when the installed torch has CUDA and nvcc is found; LADDER_KERNELS_CUDA=0/1
forces the choice. A failed compile leaves a package
that still imports and runs on the plain PyTorch path (lk.backends() says why), unless
LADDER_KERNELS_STRICT_BUILD=1, which CI sets so a broken kernel cannot hide.

Build against the torch already installed:  pip install --no-build-isolation -e .
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # isolated build envs have no torch; a clear message beats a traceback
    sys.exit(
        "ladder_kernels: torch must be installed before building, and the build must see it.\n"
        "  pip install torch && pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name)
    if value not in (None, "", "0", "1"):
        sys.exit(f"ladder_kernels: {name} must be 0 or 1, got {value!r}")
    return None if value in (None, "") else value == "1"


def _cuda_wanted():
    forced = _flag("LADDER_KERNELS_CUDA")
    nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    nvcc = nvcc or shutil.which("nvcc") is not None
    possible = torch.version.cuda is not None and nvcc
    if forced and not possible:
        sys.exit(
            "ladder_kernels: LADDER_KERNELS_CUDA=1 but "
            + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc was not found")
        )
    return possible if forced is None else forced


class _BuildExt(BuildExtension):
    """Keeps the pure-Python package installable when the compiler fails (unless strict)."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing, bad toolchain: fall back, loudly
            if _flag("LADDER_KERNELS_STRICT_BUILD"):
                raise
            warnings.warn(
                f"ladder_kernels: building {ext.name} failed ({exc}); the package will use its "
                "plain PyTorch path. Set LADDER_KERNELS_STRICT_BUILD=1 to make this an error."
            )


def _extensions():
    # Two libraries: a CUDA compile failure (or a CUDA-less torch) must not take the CPU kernels with it.
    # The C++ standard is the one torch asks for (C++20 since 2.10). -g0 overrides the -g of Python's own
    # CFLAGS: debug info for torch's headers doubles the compile time of a first install.
    cxx = ["-O3", "-g0", "-fopenmp"]
    cpu = CppExtension("ladder_kernels._C", ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
                       extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if not _cuda_wanted():
        return [cpu]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return [cpu, CUDAExtension("ladder_kernels._C_cuda", ["csrc/cuda_module.cpp", *cuda_sources],
                               extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})]


setup(
    name="ladder_kernels",
    version="0.1.0",
    description="Fused Triton, CUDA and C++ kernels for memory-light prompt tuning of CLIP models",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    license="MIT",
    # The CLIP pipeline lives in python/<package> and installs beside ladder_kernels.
    packages=find_packages(include=["ladder_kernels", "ladder_kernels.*"])
    + find_packages(where="python"),
    package_dir={p: f"python/{p}" for p in find_packages(where="python") if "." not in p},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
    # The kernels need torch alone. The ladder_clip pipeline (python/) needs the `clip` extra: transformers
    # (>= 5: its CLIPTokenizer(vocab=, merges=)), safetensors, tqdm, pillow, matplotlib (summarize's plot);
    # no torchvision (PIL + torch).
    install_requires=["torch>=2.4"],
    extras_require={
        "clip": ["transformers>=5.0", "safetensors>=0.4", "tqdm>=4.60", "pillow>=9", "matplotlib>=3.5"],
        # Triton ships with CUDA builds of torch; on CPU-only machines it is only the interpreter.
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib>=3.5", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["ladder-kernels-demo=ladder_kernels.fusion_demo:main",
                                      "ladder-clip=ladder_clip.apps.cli:run_and_exit"]},
    zip_safe=False,
)

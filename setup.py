"""Build qgait: the Python package, the Triton kernels (as ``qgait.kernels``) and ``qgait._C``.

``qgait._C`` holds the C++ CPU kernels and, when the installed torch has CUDA, the CUDA kernels.
It is built against the torch that is already installed; install with

    pip install torch==2.13.0
    pip install -e . --no-build-isolation

A plain ``pip install -e .`` works too: pip's build isolation hides the installed torch, so
this file then finds it in the environment's own site-packages (:func:`_import_torch`); it
never lets pip fetch a second torch (``--no-build-isolation`` skips the detour).
Set ``QGAIT_NO_EXT=1`` to install the pure-Python package only (reference backend), and
``QGAIT_NO_CUDA=1`` to skip the CUDA sources even when torch has CUDA.
"""
import glob
import os
import site
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_TORCH = ("qgait: building qgait._C needs torch, and none is installed in this environment: "
            "run `pip install torch==2.13.0` first (or set QGAIT_NO_EXT=1 for the pure-Python "
            "package)")


def _import_torch():
    """The torch installed in the environment being installed into.

    pip's default build isolation runs this file in a temporary environment holding only
    pyproject.toml's build requirements, so ``import torch`` fails although torch is installed.
    Listing torch there would make pip download a second copy (a multi-GB CUDA build, or
    nothing offline) whose ABI need not match the installed one. Inside that environment the
    interpreter and its sysconfig paths are still the target environment's, so the installed
    torch is found there and put at the *end* of sys.path (the isolated setuptools still wins).
    """
    try:
        import torch
        return torch
    except ImportError:
        pass
    dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    dirs += getattr(site, "getsitepackages", lambda: [])()
    dirs.append(site.getusersitepackages())
    for d in dict.fromkeys(dirs):  # unique, in order
        if d not in sys.path and os.path.isfile(os.path.join(d, "torch", "__init__.py")):
            sys.path.append(d)
    try:
        import torch
    except ImportError:
        sys.exit(NO_TORCH)  # one line, no traceback
    return torch


def _extensions():
    if os.environ.get("QGAIT_NO_EXT", "0") == "1":
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # -ffp-contract=off: the kernels write their fused multiply-adds explicitly, so every SIMD
    # level (and the scalar fallback) rounds the same way.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fdiagnostics-color=always",
           "-Wno-unused-function"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("QGAIT_NO_CUDA", "0") != "1"
    )
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        # sm_80 and sm_90 machine code plus compute_90 PTX for later GPUs, unless the user names
        # the targets the usual torch way (TORCH_CUDA_ARCH_LIST="9.0": one target, a third of
        # the nvcc time); torch then adds the flags itself
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
        ext = CUDAExtension(
            "qgait._C", sources, include_dirs=include_dirs,
            define_macros=[("QGAIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("qgait._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="qgait",
    version="0.1.0",
    description="Low-bit quantization kernels and two-stage IDC training for gait recognition",
    python_requires=">=3.10",
    packages=find_packages(include=["qgait", "qgait.*"]) + ["qgait.kernels"],
    package_dir={"qgait.kernels": "kernels"},
    package_data={"qgait": ["configs/*.yaml", "zoo/index.json", "zoo/*.qgm", "zoo/*.md",
                            "zoo/*.ref.pt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["numpy", "tqdm", "pyyaml"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest", "hypothesis"],
        "triton": ["triton==3.7.1"],
        "export": ["onnx", "onnxruntime"],
        "plot": ["matplotlib"],
        "data": ["pillow", "matplotlib"],
    },
    entry_points={"console_scripts": ["qgait=qgait.cli:main"]},
    zip_safe=False,
)

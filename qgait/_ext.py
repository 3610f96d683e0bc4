"""Loading of the compiled extension ``qgait._C`` and what it provides.

If ``qgait._C`` is missing (a pure-Python install, or a build that failed), importing qgait
still works: one warning is printed and the ``reference`` backend serves every op.
"""
from __future__ import annotations

import os
import warnings

import torch

C_ERROR: str | None = None
try:
    import importlib

    _C = importlib.import_module("qgait._C")  # importing runs the TORCH_LIBRARY registrations
    HAS_C = True
except ImportError as e:  # pragma: no cover - exercised by the no-extension CI job
    HAS_C = False
    C_ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(
        "qgait: the compiled extension qgait._C could not be imported "
        f"({C_ERROR}); only the 'reference' backend is available. Build it with "
        "'pip install -e . --no-build-isolation' against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )


# QGAIT_CPU_ISA's values (csrc/cpu/isa.h): the C++ side ignores any other (an import must not
# fail on it); this says so, once, naming the variable.
CPU_ISA_LEVELS = ("amx", "avx512", "avx2_vnni", "avx2", "scalar")
_isa_env = os.environ.get("QGAIT_CPU_ISA", "")
if HAS_C and _isa_env and _isa_env not in CPU_ISA_LEVELS:
    warnings.warn(
        f"qgait: QGAIT_CPU_ISA={_isa_env!r} is not one of {', '.join(CPU_ISA_LEVELS)}; "
        "ignored, the kernels use the widest level this CPU has",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``qgait::<op>`` has a kernel registered for ``dispatch_key`` ("CPU", "CUDA")."""
    if not HAS_C:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"qgait::{op}", dispatch_key)


def triton_status() -> tuple[bool, str]:
    """(usable, reason): Triton needs a GPU, or TRITON_INTERPRET=1 to run on the CPU."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    if torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "interpreter (TRITON_INTERPRET=1)"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


def cpu_isa() -> str:
    """The SIMD level the C++ CPU kernels use now (one of CPU_ISA_LEVELS)."""
    if not HAS_C:
        return "none"
    return torch.ops.qgait._cpu_isa()


def set_cpu_isa(isa: str) -> str:
    """Caps the C++ kernels' SIMD level at ``isa`` (one of CPU_ISA_LEVELS; "avx2" is plain
    AVX2 + FMA, "avx2_vnni" the AVX2 level with AVX-VNNI where the CPU has it); returns the old.
    Tests use it to run every fallback on one CPU."""
    if not HAS_C:
        raise RuntimeError("qgait._set_cpu_isa: the compiled extension qgait._C is not loaded")
    return torch.ops.qgait._set_cpu_isa(isa)

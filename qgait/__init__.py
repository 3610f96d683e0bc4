"""qgait: low-bit quantization kernels and two-stage IDC training for gait recognition."""
from __future__ import annotations

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Triton kernels live in the top-level kernels/ folder and are installed as qgait.kernels.
# Running from a source tree without installing, map the name onto that folder.
try:
    import qgait.kernels  # noqa: F401
except ImportError:  # pragma: no cover
    _kdir = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    if _os.path.isdir(_kdir):
        import importlib.util as _ilu

        _spec = _ilu.spec_from_file_location("qgait.kernels", _os.path.join(_kdir, "__init__.py"),
                                             submodule_search_locations=[_kdir])
        _mod = _ilu.module_from_spec(_spec)
        _sys.modules["qgait.kernels"] = _mod
        _spec.loader.exec_module(_mod)

from qgait import _ext  # noqa: E402
from qgait import ops  # noqa: E402,F401
from qgait._ext import cpu_isa, set_cpu_isa  # noqa: E402,F401
from qgait._malloc import keep_freed_memory  # noqa: E402,F401
from qgait.quant import QuantConfig, quantize_, set_quant_mode  # noqa: E402,F401


def backends() -> dict[str, dict]:
    """What is available here: {backend: {"available": bool, "why": str, ...}}."""
    import torch

    t_ok, t_why = _ext.triton_status()
    has_cuda_kernels = _ext.HAS_C and _ext.has_kernel("soft_fake_quant", "CUDA")
    return {
        "reference": {"available": True, "why": "pure PyTorch"},
        "cpu": {"available": _ext.HAS_C,
                "why": f"C++ kernels, ISA {_ext.cpu_isa()}" if _ext.HAS_C else str(_ext.C_ERROR),
                "isa": _ext.cpu_isa(),
                "features": torch.ops.qgait._cpu_features() if _ext.HAS_C else ""},
        "cuda": {"available": has_cuda_kernels and torch.cuda.is_available(),
                 "why": ("CUDA kernels" if has_cuda_kernels else
                         "qgait._C built without CUDA (torch has no CUDA)")
                 + ("" if torch.cuda.is_available() else "; no CUDA device")},
        "triton": {"available": t_ok, "why": t_why or "GPU"},
    }

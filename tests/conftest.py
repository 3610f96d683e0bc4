"""Test configuration. Triton runs on this CPU only in its interpreter: set it before any
import of triton. Tests skip (with a reason) what this machine cannot do."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import qgait  # noqa: E402
from qgait import _ext  # noqa: E402

ISA_LEVELS = ("avx512", "avx2", "scalar")


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, qgait._C loaded: {_ext.HAS_C}"]
    for name, info in qgait.backends().items():
        lines.append(f"  backend {name}: {'yes' if info['available'] else 'no'} ({info['why']})")
    return lines


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run tensors on ``device`` here (the reference always can)."""
    info = qgait.backends()
    out = ["reference"]
    if device == "cpu" and info["cpu"]["available"]:
        out.append("cpu")
    if device == "cuda" and info["cuda"]["available"]:
        out.append("cuda")
    if info["triton"]["available"]:
        out.append("triton")
    return out


def backend_params(device: str = "cpu"):
    """pytest params for every non-reference backend, skipped with a reason when missing."""
    info = qgait.backends()
    params = []
    for name in ("cpu", "triton", "cuda"):
        ok = info[name]["available"] and (name != "cpu" or device == "cpu")
        marks = () if ok else (pytest.mark.skip(reason=f"backend {name}: {info[name]['why']}"),)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _isa_ok(level: str) -> bool:
    if not _ext.HAS_C:
        return False
    order = {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 3}
    detected = torch.ops.qgait._cpu_features().split()[0].split("=")[1]
    return order[level] <= order[detected]


@pytest.fixture(params=ISA_LEVELS)
def cpu_isa(request):
    """Runs a test once per CPU SIMD level this CPU has (capping the C++ dispatch)."""
    level = request.param
    if not _isa_ok(level):
        pytest.skip(f"CPU ISA {level} not available here (or qgait._C not built)")
    prev = qgait.set_cpu_isa(level)
    try:
        yield level
    finally:
        qgait.set_cpu_isa("amx")
        del prev


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else ("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")

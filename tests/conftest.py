"""Test configuration. Tests skip (with a reason) what this machine cannot do.

Triton: on a machine with a CUDA GPU the Triton tests run the compiled kernels on CUDA tensors
(``triton_device`` / ``device_of("triton")`` is "cuda"); without one they run in Triton's CPU
interpreter, switched on here before qgait imports (and decorates) its kernels. An explicit
``TRITON_INTERPRET`` in the environment wins either way."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

import qgait  # noqa: E402
from qgait import _ext  # noqa: E402

ISA_LEVELS = _ext.CPU_ISA_LEVELS  # ("amx", "avx512", "avx2_vnni", "avx2", "scalar")


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
    order = {"scalar": 0, "avx2": 1, "avx2_vnni": 1, "avx512": 2, "amx": 3}
    feats = torch.ops.qgait._cpu_features()
    detected = feats.split()[0].split("=")[1]
    if level == "avx2_vnni" and "avx_vnni=1" not in feats:
        return False  # the AVX2 level with AVX-VNNI needs the instruction
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


def triton_device_name() -> str:
    """Where the Triton backend's tests put their tensors: "cuda" when the kernels are compiled
    for a GPU, "cpu" under the interpreter."""
    return "cpu" if TRITON_INTERPRETED else "cuda"


def device_of(backend: str) -> str:
    """The device of the tensors a test of ``backend`` feeds it."""
    if backend == "cuda":
        return "cuda"
    return triton_device_name() if backend == "triton" else "cpu"


@pytest.fixture
def triton_device():
    """The Triton tests' device ("cuda" compiled, "cpu" interpreted); skips without Triton."""
    info = qgait.backends()["triton"]
    if not info["available"]:
        pytest.skip(f"backend triton: {info['why']}")
    return torch.device(triton_device_name())


@pytest.fixture
def triton_debug(monkeypatch):
    """Device asserts of the Triton kernels active. Compiled kernels have them already (the
    launchers pass debug=True); the interpreter checks them only when its options say debug."""
    if TRITON_INTERPRETED:
        import dataclasses

        from triton.runtime import interpreter

        b = interpreter.interpreter_builder
        monkeypatch.setattr(b, "options", dataclasses.replace(b.options, debug=True))
    return TRITON_INTERPRETED

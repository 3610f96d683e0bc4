"""bench/avx2_ceiling.py and bench/peak/avx2_steps.cpp: the AVX2 class's measured int8 step
ceilings build, run every step kind, and print a fraction of its ceiling for each kernel of a
benchmark layer. Rates are printed by the script, never checked here."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _lib():
    sys.path.insert(0, str(BENCH))
    try:
        from _common import avx2_steps_lib
    finally:
        sys.path.remove(str(BENCH))
    lib = avx2_steps_lib()
    if isinstance(lib, str):
        pytest.skip(lib)
    return lib


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no C++ compiler to build bench/peak/avx2_steps.cpp")
def test_avx2_steps_counts():
    lib = _lib()
    # multiply-adds per step: 12 vpmaddubsw of 32 (kinds 0, 1, 3), 10 for the 5-pixel GEMM step
    assert lib.avx2_step_kinds() == 4
    assert [lib.avx2_step_macs(k) for k in range(4)] == [384, 384, 320, 384]
    assert lib.avx2_step_macs(4) == 0 and lib.avx2_steps(4, 1000) == 0
    assert lib.avx2_step_macs(-1) == 0 and lib.avx2_steps(-1, 1000) == 0
    for kind in range(4):
        n = lib.avx2_steps(kind, 100_000)
        # whole walks of 100 steps, at least the multiply-adds asked for
        assert n >= 100_000 and n % (100 * lib.avx2_step_macs(kind)) == 0


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no C++ compiler to build bench/peak/avx2_steps.cpp")
def test_avx2_ceiling_script_smallest():
    _lib()
    p = subprocess.run([sys.executable, str(BENCH / "avx2_ceiling.py"), "--rounds", "1",
                        "--layers", "A"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = p.stdout
    assert out.startswith("CPU class: "), out[:500]
    steps = re.findall(r"^\| ([^|]+?) \| (\d+\.\d) \| (\d+)% \|$", out, re.M)
    assert len(steps) == 4 and steps[0][2] == "100", out
    assert re.search(r"^ceiling ratio, qgait int16 step / int8 GEMM step: \d+\.\d\dx", out, re.M)
    rows = re.findall(r"^\| A \| (qgait W8A8|qgait W4A8|qgait W4A4|torch.ao int8) \| (\S+) \| "
                      r"\d+\.\d \| (\d+%|-) \|$", out, re.M)
    if "x86" not in __import__("torch").backends.quantized.supported_engines:
        pytest.skip("torch has no x86 quantized engine")
    assert [r[0] for r in rows] == ["qgait W8A8", "qgait W4A8", "qgait W4A4", "torch.ao int8"]
    assert re.search(r"^layer A: qgait / torch.ao  W8A8 \d+\.\d\dx, W4A8 \d+\.\d\dx, "
                     r"W4A4 \d+\.\d\dx$", out, re.M), out

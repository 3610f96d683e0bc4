"""bench/paired_peers_model.py runs end to end at its smallest settings: every contender is built
(torch fp32, torch int8, onnxruntime int8 QOperator / QDQ, qgait packed W8A8 / W4A8 / W4A4 and
the optional W8A7), the embeddings agree with the fp32 model's, and a ratio line is printed for
each qgait model.
Times are printed by the script, never checked here."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "paired_peers_model.py"


def test_paired_peers_model_smallest():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "--widths", "0.25", "--frames", "4",
                        "--rounds", "1", "--calib", "1", "--threads", "1", "--warm", "1",
                        "--bits", "W8A8", "W4A8", "W4A4", "W8A7"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert out.startswith("CPU class: "), out[:500]
    assert "1 untimed calls before each timed one" in out, out[:1000]
    for bits in ("W8A8", "W4A8", "W4A4", "W8A7"):
        assert re.search(rf"^ratio width 0.25 {bits}: fastest peer \(.+\) / qgait .* \d+\.\d+x",
                         out, re.M), out
    cos = dict(re.findall(r"^  width 0.25 (.+?)\s+\d+\.\d+ ms .*cosine to fp32 (-?\d\.\d+)$",
                          out, re.M))
    int8 = ["onnxruntime int8 QOperator", "onnxruntime int8 QDQ", "qgait W8A8 packed",
            "qgait W8A7 packed"]
    if "x86" in torch.backends.quantized.supported_engines:
        int8.append("torch int8 x86")
    for label in ["torch fp32 eager", *int8]:
        assert label in cos, (label, out)
    # the int8 peers are working int8 models (an int8 graph gone wrong lands far below this)
    for label in int8:
        assert float(cos[label]) > 0.99, (label, out)


AMX_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "paired_amx.py"


def test_paired_amx_smallest():
    """bench/paired_amx.py on a CPU with AMX-INT8: both sides of each layer named (the AMX side
    on the amx path for every layer but the stem) and a ratio line; elsewhere it exits with the
    reason."""
    from qgait import _ext

    if not _ext.HAS_C:
        pytest.skip("qgait._C not built")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(AMX_SCRIPT), "--rounds", "1", "--models",
                        "casiab-lite3d-w4a4-packed"], capture_output=True, text=True,
                       timeout=300, env=env)
    if "amx_int8=1" not in torch.ops.qgait._cpu_features():
        assert p.returncode != 0 and "no AMX-INT8" in p.stderr, p.stderr[-2000:]
        return
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert re.search(r"^casiab-lite3d-w4a4-packed: VNNI .* ms, AMX .* ms per sequence", out,
                     re.M), out
    layers = re.findall(r"^  (\S+)\s+(\S+)\s+\d+\.\d+ ms\s+(\S+)\s+\d+\.\d+ ms", out, re.M)
    assert len(layers) == 6, out
    for name, vnni, amx in layers:
        assert not vnni.startswith("amx")
        assert (amx == "amx") == (name != "stem.0"), (name, amx)

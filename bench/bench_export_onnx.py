"""Exported ONNX models in onnxruntime (CPU) against the torch models they come from: latency
per 30-frame 64 x 44 sequence, and the .onnx file sizes (extra_info ``onnx_bytes``).

Groups ``onnx <model> <precision>``; models: ``tiny`` (the test model of
tests/test_export_onnx.py) and ``gaitlite3d`` (qgait.models.GaitLite3D, width 1, no classifier);
precisions fp32 (no SoftQuant layers), w8a8, w4a4. Providers:

* onnxruntime: the exported graph (role "qgait");
* torch: the model that was exported, eager (fp32, or the hard-mode fake-quant model: what
  ``qgait eval`` runs without an export; role "baseline");
* onnxruntime-fp32: the fp32 export of the same model, for the cost of the QDQ nodes (the
  weights are dequantized at run time and the convolutions run in fp32: onnxruntime fuses
  QDQ into integer kernels only for DQ -> op -> Q patterns, and these convolutions are followed
  by BatchNorm + activation, not by a QuantizeLinear).

One thread for both runtimes (the machine is shared). Run with
``pytest bench/bench_export_onnx.py --benchmark-only``.
"""
import copy
import os
import sys
import tempfile

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import qgait  # noqa: E402
from qgait.export import OnnxEmbedder, export_onnx  # noqa: E402
from qgait.export.onnx import default_example  # noqa: E402
from qgait.nn.soft_quant import SoftQuantConv3d, SoftQuantLinear  # noqa: E402

from _common import machine_info  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_export_onnx import calibrate, make_model  # noqa: E402

FRAMES = 30
PRECISIONS = {"fp32": None, "w8a8": (8, 8), "w4a4": (4, 4)}
PROVIDERS = ["onnxruntime", "torch", "onnxruntime-fp32"]
_DIR = tempfile.mkdtemp(prefix="qgait_bench_onnx_")
_CACHE = {}


def _floatify(model: nn.Module) -> nn.Module:
    """A copy with every SoftQuant layer replaced by its float layer (same weights)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, SoftQuantConv3d):
                parent._modules[name] = child.to_float()
            elif isinstance(child, SoftQuantLinear):
                lin = nn.Linear(child.in_features, child.out_features, child.bias is not None)
                lin.load_state_dict({k: v for k, v in child.state_dict().items()
                                     if k in ("weight", "bias")})
                parent._modules[name] = lin
    return model.eval()


def _gaitlite3d(bits):
    from qgait.models import GaitLite3D

    torch.manual_seed(0)
    m = GaitLite3D(num_classes=0, width=1.0)
    if bits is not None:
        qgait.quantize_(m, qgait.QuantConfig(w_bits=bits[0], a_bits=bits[1]))
    return calibrate(m, torch.cat([default_example(m, 12, seed=s) for s in range(3)]))


def _build(model_name, precision):
    """(torch model, onnx path, export info), cached per (model, precision)."""
    key = (model_name, precision)
    if key not in _CACHE:
        bits = PRECISIONS[precision]
        if model_name == "tiny":
            m = make_model(*(bits or (8, 8)))
            if bits is None:
                m = _floatify(m)
        else:
            m = _gaitlite3d(bits)
        path = os.path.join(_DIR, f"{model_name}_{precision}.onnx")
        with pytest.warns(UserWarning) if bits is None else _nullcontext():
            info = export_onnx(m, path, example=default_example(m, 8), check=False)
        _CACHE[key] = (m, path, info)
    return _CACHE[key]


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model_name", ["tiny", "gaitlite3d"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_onnx_latency(benchmark, provider, model_name, precision):
    if provider == "onnxruntime-fp32" and precision == "fp32":
        pytest.skip("same as onnxruntime in the fp32 group")
    torch.set_num_threads(1)
    model, path, info = _build(model_name, precision)
    x = default_example(model, FRAMES, seed=1)
    if provider == "torch":
        def fn():
            with torch.inference_mode():
                return model(x)["embeddings"]
    else:
        p = _build(model_name, "fp32")[1] if provider == "onnxruntime-fp32" else path
        emb = OnnxEmbedder(p, threads=1)
        fn = lambda: emb(x)  # noqa: E731
    fn()  # warm-up (onnxruntime's first run allocates its arena)
    benchmark.group = f"onnx {model_name} {precision}"
    benchmark.extra_info.update(
        provider=provider, role="qgait" if provider == "onnxruntime" else "baseline",
        onnx_bytes=os.path.getsize(path), opset=info["opset"], int4=info["int4"],
        frames=FRAMES, ort_threads=1, **machine_info())
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)

"""packed_conv3d against the convolutions a user would otherwise run, in one run.

    pytest bench/bench_packed_conv3d.py --benchmark-only --benchmark-min-rounds=2

Layers (kernel 3x3x3, padding 1): A [4, 32, 30, 64, 44] -> 64, B [4, 64, 30, 32, 22] -> 128.
Cases: W8A8 (int8 weights in [-127, 127], 8-bit activations), W4A8 (int4 weights), W4A4 (int4
weights, 4-bit activations); the baselines run the int8 weights.
The AVX2 class on an AVX-512 machine: cap both sides in the same run,
    QGAIT_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 pytest bench/bench_packed_conv3d.py ...
Modes:
  f32io  float32 in, float32 out. qgait W8A8 / W4A8 / W4A4 (activation quantized inside the op);
         torch fp32 conv3d; torch bf16 channels-last conv3d; torch.ao.nn.quantized.Conv3d (x86
         engine) including its quantize_per_tensor and dequantize.
  q8io   8-bit codes in, 8-bit codes out (channels-last): qgait int8 / int4 with requantized
         output; torch.ao.nn.quantized.Conv3d on a quint8 channels-last tensor.
  peak   the int8 ceiling of this CPU: the layer's MAC count as register-only AVX-512 VNNI
         vpdpbusd (bench/peak/int8_peak.cpp, built here with the system C++ compiler), so each
         convolution's "% of peak" is measured in the same run; on a CPU with AMX-INT8 also as
         register-only tdpbusd (amx_peak), the ceiling of qgait's AMX path.
extra_info: ops = 2 * MACs (TOPS), weight_bytes.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from qgait.ops import packed_conv3d
from qgait.quant import pack_weight

from _common import amx_peak_lib, int8_peak_lib, machine_info

LAYERS = {"A": ((4, 32, 30, 64, 44), 64), "B": ((4, 64, 30, 32, 22), 128)}
X_SCALE, OUT_SCALE = 0.01, 0.05


# (label, weight bits, activation bits): int8 weights span [-127, 127], int4 [-8, 7]; 4-bit
# activations take the step 1/15 (codes 0..15 of x in [0, 1)), 8-bit ones X_SCALE.
CASES = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


def _x_scale(a_bits):
    return X_SCALE if a_bits == 8 else 1.0 / 15


def _layer(name, w_bits=4):
    (n, ci, t, h, w), co = LAYERS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, ci, t, h, w, generator=g)  # post-ReLU activations
    lo, hi = (-8, 8) if w_bits == 4 else (-127, 128)
    w_int = torch.randint(lo, hi, (co, ci, 3, 3, 3), generator=g)
    w_scale = torch.rand(co, generator=g) * 0.01 + 1e-3
    bias = torch.randn(co, generator=g) * 0.1
    macs = n * t * h * w * ci * co * 27
    return x, w_int, w_scale, bias, macs


def _qgait(bits, mode, x, w_int, w_scale, bias, a_bits=8):
    wp = pack_weight(w_int, bits)
    ci, xs = x.shape[1], _x_scale(a_bits)
    kw = dict(w_bits=bits, c_in=ci, x_scale=torch.tensor(xs), in_bits=a_bits, padding=1,
              bias=bias, act="relu")
    if mode == "f32io":
        return (lambda: packed_conv3d(x, wp, w_scale, **kw)), wp.numel()
    xq = torch.round(torch.clamp(x / xs, 0, 2 ** a_bits - 1)).to(torch.uint8).contiguous(
        memory_format=torch.channels_last_3d)
    return (lambda: packed_conv3d(xq, wp, w_scale, out="quant", out_scale=torch.tensor(OUT_SCALE),
                                  **kw)), wp.numel()


def _torch_ao(mode, x, w_int, w_scale, bias):
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = "x86"
    co, ci = w_int.shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = nnq.Conv3d(ci, co, 3, padding=1)
        qw = torch.quantize_per_channel(w_int.float() * w_scale.reshape(-1, 1, 1, 1, 1), w_scale,
                                        torch.zeros(co, dtype=torch.long), 0, torch.qint8)
        conv.set_weight_bias(qw, bias)
        conv.scale, conv.zero_point = OUT_SCALE, 0
        relu = torch.nn.ReLU()
        if mode == "f32io":
            def run():
                q = torch.quantize_per_tensor(x, X_SCALE, 0, torch.quint8)
                return relu(conv(q)).dequantize()
            return run, co * ci * 27
        q = torch.quantize_per_tensor(x, X_SCALE, 0, torch.quint8).contiguous(
            memory_format=torch.channels_last_3d)
        return (lambda: conv(q)), co * ci * 27


def _peak(macs, amx=False):
    lib = amx_peak_lib() if amx else int8_peak_lib()
    if isinstance(lib, str):
        pytest.skip(lib)
    threads = torch.get_num_threads()
    if amx:
        return lambda: lib.amx_peak(macs, threads)
    return lambda: lib.int8_peak(macs, threads)


def _torch_float(dtype, x, w_int, w_scale, bias):
    w = (w_int.float() * w_scale.reshape(-1, 1, 1, 1, 1))
    if dtype == torch.float32:
        return (lambda: F.relu(F.conv3d(x, w, bias, padding=1))), w.numel() * 4
    xb = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    wb = w.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    bb = bias.to(dtype)
    return (lambda: F.relu(F.conv3d(xb, wb, bb, padding=1))), w.numel() * 2


PROVIDERS = [  # (provider, mode, role)
    ("qgait_w8a8", "f32io", "qgait"), ("qgait_w4a8", "f32io", "qgait"),
    ("qgait_w4a4", "f32io", "qgait"),
    ("torch_fp32", "f32io", "baseline"), ("torch_bf16_cl", "f32io", "baseline"),
    ("torch_ao_x86", "f32io", "baseline"),
    ("qgait_w8a8", "q8io", "qgait"), ("qgait_w4a8", "q8io", "qgait"),
    ("qgait_w4a4", "q8io", "qgait"),
    ("torch_ao_x86", "q8io", "baseline"),
    ("int8_peak", "f32io", "ceiling"), ("int8_peak", "q8io", "ceiling"),
    ("amx_peak", "f32io", "ceiling"), ("amx_peak", "q8io", "ceiling"),
]


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("provider,mode,role", PROVIDERS,
                         ids=[f"{p}-{m}" for p, m, _ in PROVIDERS])
def test_packed_conv3d(benchmark, provider, mode, role, layer):
    # int8 weights span [-127, 127] (qgait W8A8 and every baseline), int4 ones [-8, 7]
    w_bits, a_bits = CASES[provider[6:].upper()] if provider.startswith("qgait") else (8, 8)
    x, w_int, w_scale, bias, macs = _layer(layer, w_bits)
    if provider.startswith("qgait"):
        fn, wbytes = _qgait(w_bits, mode, x, w_int, w_scale, bias, a_bits)
    elif provider in ("int8_peak", "amx_peak"):
        fn, wbytes = _peak(macs, amx=provider == "amx_peak"), 0
    elif provider == "torch_ao_x86":
        if "x86" not in torch.backends.quantized.supported_engines:
            pytest.skip("torch has no x86 quantized engine")
        fn, wbytes = _torch_ao(mode, x, w_int, w_scale, bias)
    else:
        fn, wbytes = _torch_float(torch.float32 if provider == "torch_fp32" else torch.bfloat16,
                                  x, w_int, w_scale, bias)
    benchmark.group = f"packed_conv3d layer{layer} {mode}"
    benchmark.extra_info.update(provider=provider, role=role, ops=2 * macs, weight_bytes=wbytes,
                                **machine_info())
    with torch.no_grad():
        for _ in range(3):  # warm-up: scratch buffers grown, huge pages for the output mapped
            fn()
        benchmark(fn)

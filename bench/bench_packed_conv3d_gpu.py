"""packed_conv3d on a CUDA GPU against the convolutions torch runs there, in one run.

    pytest bench/bench_packed_conv3d_gpu.py --benchmark-only

The layers and data are bench_packed_conv3d.py's (A [4, 32, 30, 64, 44] -> 64 and
B [4, 64, 30, 32, 22] -> 128, kernel 3x3x3, padding 1), on the GPU, for W8A8 / W4A8 / W4A4
(weights on the int4 grid, packed as int8 or int4: the values do not change the time):

* qgait-cuda / qgait-triton: float32 in, float32 out (the activation is quantized in the op);
* cudnn-fp16 / cudnn-bf16: ``F.conv3d`` of channels-last half tensors (cuDNN), the float
  baseline a user would otherwise run;
* cudnn-int8: torch has no int8 Conv3d on CUDA (torch.ao's quantized convolutions are CPU
  only), so it is reported as skipped with that reason.

extra_info: ops = 2 * MACs (TOPS). Skips everything without CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

import qgait
from qgait.ops import packed_conv3d
from qgait.quant import pack_weight

from _common import machine_info, timed_round
from bench_packed_conv3d import LAYERS, X_SCALE, _layer

# (weight bits, activation bits); 4-bit activations take the step 1/15 (codes of x in [0, 1))
CASES = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROVIDERS = [(f"qgait-{b}-{c.lower()}", "qgait") for b in ("cuda", "triton") for c in CASES]
PROVIDERS += [("cudnn-fp16", "baseline"), ("cudnn-bf16", "baseline"), ("cudnn-int8", "baseline")]


def _run_fn(provider, layer):
    if provider == "cudnn-int8":
        pytest.skip("torch has no int8 Conv3d on CUDA (torch.ao quantized convs are CPU only)")
    if provider.startswith("qgait-"):
        _, backend, case = provider.split("-")
        info = qgait.backends()[backend]
        if not info["available"]:
            pytest.skip(f"{provider} unavailable: {info['why']}")
        w_bits, a_bits = CASES[case.upper()]
    else:
        w_bits, a_bits = 8, 8
    x, w_int, w_scale, bias, macs = _layer(layer)
    x, w_scale, bias = x.cuda(), w_scale.cuda(), bias.cuda()
    if provider.startswith("qgait-"):
        wp = pack_weight(w_int, w_bits).cuda()
        xs = torch.tensor(X_SCALE if a_bits == 8 else 1.0 / 15, device="cuda")
        return (lambda: packed_conv3d(x, wp, w_scale, w_bits=w_bits, c_in=x.shape[1],
                                      x_scale=xs, in_bits=a_bits, padding=1, bias=bias,
                                      act="relu", backend=backend)), macs
    dtype = torch.float16 if provider == "cudnn-fp16" else torch.bfloat16
    w = (w_int.float().cuda() * w_scale.reshape(-1, 1, 1, 1, 1)).to(dtype).contiguous(
        memory_format=torch.channels_last_3d)
    xb = x.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    bb = bias.to(dtype)
    return (lambda: F.relu(F.conv3d(xb, w, bb, padding=1))), macs


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("provider,role", PROVIDERS, ids=[p for p, _ in PROVIDERS])
def test_packed_conv3d_gpu(benchmark, provider, role, layer):
    fn, macs = _run_fn(provider, layer)
    run, calls = timed_round(fn, torch.cuda.synchronize, True)
    run()  # warm-up: Triton compiles, cuDNN picks its algorithm
    benchmark.group = f"packed_conv3d gpu layer {layer}"
    benchmark.extra_info.update(provider=provider, role=role, ops=2 * macs, calls=calls,
                                **machine_info())
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)

"""soft_fake_quant against what a user would otherwise run, in one run:

* qgait-<backend>: the fused kernel (cpu here; cuda / triton on a GPU);
* reference: the pure-PyTorch reference, eager;
* compiled-reference: ``torch.compile`` of the reference;
* torch-learnable: ``torch._fake_quantize_learnable_{per_tensor,per_channel}_affine`` (LSQ,
  torch's own learnable fake quant; the natural baseline for stage 1);
* copy: ``dst.copy_(x)`` of the same tensor, the memory-bandwidth ceiling (role "ceiling").

Modes: forward, backward (given the graph), full (forward + backward). Run with
``pytest bench/bench_soft_quant.py --benchmark-only``; ratios print at the end.
"""
import pytest
import torch

import qgait
from qgait.ops import soft_fake_quant
from qgait.ops.soft_quant import _SoftFakeQuantRef, default_gamma

from _common import machine_info, timed_round

# The backward-only mode calls backward on one graph repeatedly (retain_graph=True), which
# torch.compile's donated buffers forbid; keep them off for the compiled baseline.
import torch._functorch.config  # noqa: E402

torch._functorch.config.donated_buffer = False

SHAPES = {
    "16M": ((4096, 4096), 0),  # (shape, channel axis for per-channel)
    "act[8,64,30,32,22]": ((8, 64, 30, 32, 22), 1),
}
BITS = 4
ON_GPU = torch.cuda.is_available()
if ON_GPU:  # 1 GiB: on a GPU the shapes above take tens of microseconds, near launch overhead
    SHAPES["256M"] = ((16384, 16384), 0)
DEVICE = "cuda" if ON_GPU else "cpu"
QGAIT = ["qgait-cuda", "qgait-triton"] if ON_GPU else ["qgait-cpu"]
PROVIDERS = QGAIT + ["reference", "compiled-reference", "torch-learnable", "copy"]


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _make(shape_name, gran):
    shape, axis = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2).to(DEVICE)
    if gran == "per-tensor":
        s, axis = torch.tensor([0.25], device=DEVICE), None
    else:
        s = (torch.rand(shape[axis], generator=g) * 0.3 + 0.1).to(DEVICE)
    return x, s, axis


def _forward_fn(provider, x, s, axis):
    qn, qp = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
    gamma = default_gamma(x.numel(), 1 if axis is None else s.numel(), qp)
    if provider.startswith("qgait-"):
        b = provider.split("-", 1)[1]
        return lambda x, s: soft_fake_quant(x, s, bits=BITS, axis=axis, k=0.0, gamma=gamma,
                                            backend=b)
    if provider in ("reference", "compiled-reference"):
        ax = -1 if axis is None else axis

        def ref(x, s):
            return _SoftFakeQuantRef.apply(x, s.reshape(()) if ax < 0 else s, ax, qn, qp, 0.0,
                                           False, gamma)
        return torch.compile(ref) if provider == "compiled-reference" else ref
    if provider == "torch-learnable":
        if axis is None:
            zp = torch.zeros(1, device=x.device)
            return lambda x, s: torch._fake_quantize_learnable_per_tensor_affine(
                x, s, zp, qn, qp, gamma)
        zp = torch.zeros(s.numel(), device=x.device)
        return lambda x, s: torch._fake_quantize_learnable_per_channel_affine(
            x, s, zp, axis, qn, qp, gamma)
    raise ValueError(provider)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_soft_fake_quant(benchmark, provider, mode, gran, shape_name):
    if provider.startswith("qgait-") and not qgait.backends()[provider.split("-", 1)[1]]["available"]:
        pytest.skip(f"{provider} unavailable here")
    x, s, axis = _make(shape_name, gran)
    n = x.numel()
    benchmark.group = f"soft_fake_quant {shape_name} {gran} {mode}"
    role = "qgait" if provider.startswith("qgait-") else (
        "ceiling" if provider == "copy" else "baseline")
    traffic = {"forward": 2, "backward": 3, "full": 5}[mode]  # fp32 tensors read + written
    benchmark.extra_info.update(provider=provider, role=role, bytes=traffic * n * 4,
                                **machine_info())
    rounds = 3 if provider in ("reference", "compiled-reference", "torch-learnable") else 8

    if provider == "copy":
        dst = torch.empty_like(x)
        benchmark.extra_info["bytes"] = 2 * n * 4
        run, calls = timed_round(lambda: dst.copy_(x), _sync, ON_GPU)
        benchmark.extra_info["calls"] = calls
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
        return

    fn = _forward_fn(provider, x, s, axis)
    xg = x.clone().requires_grad_()
    sg = s.clone().requires_grad_()
    gy = torch.ones_like(x)
    if mode == "forward":
        def body():
            with torch.no_grad():
                fn(xg, sg)
    elif mode == "backward":
        y = fn(xg, sg)

        def body():
            torch.autograd.grad(y, (xg, sg), gy, retain_graph=True)
    else:
        def body():
            torch.autograd.grad(fn(xg, sg), (xg, sg), gy)
    run, calls = timed_round(body, _sync, ON_GPU)
    benchmark.extra_info["calls"] = calls
    run()  # warm-up (compiles the torch.compile provider)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)

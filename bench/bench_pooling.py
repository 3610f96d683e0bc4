"""Temporal pooling + horizontal pyramid pooling: qgait's fused op against the chain of eager
calls every gait codebase runs (torch.max over T, then view / mean / max per bin), that chain
under torch.compile, and the memory floor every implementation must pay: ``x.sum()`` of the same
tensor for the forward (one read), plus ``torch.zeros_like(x)`` for the forward+backward (one read
of x and one write of a fresh dL/dx, which is as large as x).

    pytest bench/bench_pooling.py --benchmark-only --benchmark-min-rounds=5

Shapes are the heads of real models (GaitBase-like on 64x44 silhouettes: [N, 128, 30, 16, 11];
a wider backbone: [N, 256, 30, 32, 22]); forward and forward+backward (the gradient is taken with
torch.autograd.grad, so no .grad accumulation is timed). On a CUDA machine the qgait providers
are the cuda and triton backends on GPU tensors (``python -m qgait.gpu_check`` runs this file).
"""
import pytest
import torch

import qgait
from qgait.ops import set_pool_hpp

from _common import machine_info, timed_round

SHAPES = {"N32-C128-T30-H16-W11": (32, 128, 30, 16, 11),
          "N8-C256-T30-H32-W22": (8, 256, 30, 32, 22)}
BINS = {"bins16": (16,), "bins16-8-4-2-1": (16, 8, 4, 2, 1)}
ON_GPU = torch.cuda.is_available()
if ON_GPU:  # 346 MB: on a GPU the shapes above take tens of microseconds, near launch overhead
    SHAPES["N64-C256-T30-H32-W22"] = (64, 256, 30, 32, 22)
DEVICE = "cuda" if ON_GPU else "cpu"
QGAIT = ["qgait-cuda", "qgait-triton"] if ON_GPU else ["qgait-cpu"]
PROVIDERS = {**{p: "qgait" for p in QGAIT}, "eager": "baseline", "compiled": "baseline",
             "floor": "ceiling"}
MODES = ("forward", "forward+backward")


def opengait_chain(x, bins):
    """What OpenGait runs: PackSequenceWrapper(torch.max) then HorizontalPoolingPyramid."""
    z = torch.max(x, dim=2)[0]
    n, c = z.shape[:2]
    feats = []
    for b in bins:
        s = z.view(n, c, b, -1)
        feats.append(s.mean(-1) + s.max(-1)[0])
    return torch.cat(feats, -1)


_COMPILED = {}


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _fn(provider, bins):
    if provider.startswith("qgait-"):
        backend = provider.split("-", 1)[1]
        return lambda x: set_pool_hpp(x, bins=bins, backend=backend)
    if provider == "eager":
        return lambda x: opengait_chain(x, bins)
    if provider == "compiled":
        if bins not in _COMPILED:
            _COMPILED[bins] = torch.compile(lambda x: opengait_chain(x, bins), dynamic=False)
        return _COMPILED[bins]
    return lambda x: x.sum()  # the floor's forward: one read of x


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bins", list(BINS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_set_pool_hpp(benchmark, provider, mode, bins, shape):
    if provider.startswith("qgait-"):
        info = qgait.backends()[provider.split("-", 1)[1]]
        if not info["available"]:
            pytest.skip(f"{provider} unavailable here: {info['why']}")
    dims, b = SHAPES[shape], BINS[bins]
    x = torch.randn(dims, device=DEVICE)
    fn = _fn(provider, b)
    nbytes = x.numel() * x.element_size()
    if mode == "forward":
        def body():
            return fn(x)
    elif provider == "floor":
        def body():  # one read, one fresh write
            return x.sum(), torch.zeros_like(x)
        nbytes *= 2
    else:
        x.requires_grad_()
        g = torch.randn(dims[0], dims[1], sum(b), device=DEVICE)

        def body():
            return torch.autograd.grad(fn(x), x, g)[0]

        nbytes *= 2  # read x, write dx
    run, calls = timed_round(body, _sync, ON_GPU)
    run()  # warm-up (compilation for the compiled chain)
    benchmark.group = f"set_pool_hpp {shape} {bins} {mode}"
    benchmark.extra_info.update(provider=provider, role=PROVIDERS[provider], bytes=nbytes,
                                calls=calls, **machine_info())
    benchmark(run)

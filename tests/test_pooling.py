"""Tests of qgait.ops.pooling: every backend against the reference and against OpenGait's
semantics (written here independently: view to strips, mean + max)."""
import pytest
import torch

import qgait
from qgait.ops import pooling as P
from qgait.ops.pooling import (horizontal_pyramid_pool, set_pool_hpp, set_pool_hpp_ref,
                               temporal_pool)

from conftest import backend_params, device_of


# ---- OpenGait semantics, written independently of qgait's reference -------------------------
def opengait_hpp(x, bins):
    """HorizontalPoolingPyramid: x [n, c, h, w] -> [n, c, sum(bins)] (bins divide h)."""
    n, c = x.shape[:2]
    feats = []
    for b in bins:
        z = x.view(n, c, b, -1)
        z = z.mean(-1) + z.max(-1)[0]
        feats.append(z)
    return torch.cat(feats, -1)


def opengait_set_pool(x, seqL=None):
    """PackSequenceWrapper(torch.max) over dim 2."""
    if seqL is None:
        return torch.max(x, dim=2)[0]
    starts = [sum(seqL[:i]) for i in range(len(seqL))]
    rets = [torch.max(x.narrow(2, s, l), dim=2)[0] for s, l in zip(starts, seqL)]
    return torch.cat(rets)


def rand_x(shape, dtype=torch.float32, kind="randn", seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(shape, generator=g)
    elif kind == "binary":  # silhouette-like feature maps: many exact ties
        x = (torch.rand(shape, generator=g) > 0.5).float()
    elif kind == "const":
        x = torch.full(shape, 0.25)
    else:  # few distinct values: ties everywhere, but not all equal
        x = torch.randint(0, 3, shape, generator=g).float()
    return x.to(dtype)


# ---- the reference itself -------------------------------------------------------------------
@pytest.mark.parametrize("bins", [(16, 8, 4, 2, 1), (16,), (1, 2, 4, 8, 16)])
@pytest.mark.parametrize("seqL", [None, [3, 1, 4]])
def test_reference_matches_opengait(bins, seqL):
    x = rand_x((1 if seqL else 2, 5, 8, 16, 7))
    want = opengait_hpp(opengait_set_pool(x, seqL), bins)
    got = set_pool_hpp_ref(x, seqL, bins)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reference_gradcheck_float64():
    x = rand_x((1, 2, 5, 6, 3), torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda t: set_pool_hpp_ref(t, [2, 3], (3, 2, 4)), (x,))


def test_strip_bounds_adaptive():
    assert P.strip_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert P.strip_bounds(10, 3) == [(0, 4), (3, 7), (6, 10)]
    assert P.strip_bounds(10, 3) == [(i * 10 // 3, -(-(i + 1) * 10 // 3)) for i in range(3)]


# ---- every backend against the reference ----------------------------------------------------
BACKENDS = backend_params("cpu")
KINDS = ["randn", "binary", "const", "few"]


def _close_mean(got, want, dtype):
    """max terms are exact; mean terms differ by the order of an fp32 sum (1e-6 relative)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # one rounding to the output dtype of values that agree to fp32 precision
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=eps)


def _grads(fn, x, w):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (g,) = torch.autograd.grad((y.float() * w).sum(), x)
    return y.detach(), g


CASES = [  # (shape [N, C, T, H, W], seqL, bins)
    ((2, 3, 5, 16, 7), None, (16, 8, 4, 2, 1)),
    ((1, 4, 6, 16, 11), [2, 1, 3], (16,)),
    ((1, 2, 7, 16, 3), [7], (1, 2, 4, 8, 16)),
    ((2, 2, 3, 10, 5), None, (3, 4)),                # H not divisible by a bin
    ((1, 1, 1, 64, 2), None, (64,)),                 # T = 1, N*C = 1, one row per strip
    ((1, 3, 9, 12, 4), [1, 1, 1, 1, 1, 1, 1, 1, 1], (5, 2, 1)),  # many length-1 sequences
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["mean+max", "max", "mean"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_set_pool_hpp_matches_reference(backend, kind, mode, case):
    shape, seqL, bins = CASES[case]
    if backend == "triton" and (kind in ("const", "few") or mode == "mean"):
        pytest.skip("triton interpreter: a subset of the grid keeps the run short")
    dev = device_of(backend)
    x = rand_x(shape, kind=kind, seed=case).to(dev)
    n_out = len(seqL) if seqL else shape[0]
    w = rand_x((n_out, shape[1], sum(bins)), seed=100 + case).to(dev)
    y, g = _grads(lambda t: set_pool_hpp(t, seqL, bins, mode, backend=backend), x, w)
    y_ref, g_ref = _grads(lambda t: set_pool_hpp_ref(t, seqL, bins, mode), x, w)
    if mode == "max":
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    else:
        _close_mean(y, y_ref, torch.float32)
    _close_mean(g, g_ref, torch.float32)
    # the max terms' gradient lands on exactly one element per strip (first index on ties)
    if mode == "max":
        assert int((g != 0).sum()) <= w.numel()
    if all(shape[3] % b == 0 for b in bins) and mode == "mean+max":
        want = opengait_hpp(opengait_set_pool(x, seqL), bins)
        _close_mean(y, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["randn", "binary"])
@pytest.mark.parametrize("seqL", [None, [4], [1, 3, 2]])
def test_temporal_pool_matches_reference(backend, kind, seqL):
    shape = (2 if seqL is None else 1, 3, sum(seqL) if seqL else 6, 5, 7)
    dev = device_of(backend)
    x = rand_x(shape, kind=kind).to(dev)
    w = rand_x((len(seqL) if seqL else 2, 3, 5, 7), seed=7).to(dev)
    y, g = _grads(lambda t: temporal_pool(t, seqL, backend=backend), x, w)
    y_ref, g_ref = _grads(lambda t: P.temporal_pool_ref(t, seqL), x, w)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)  # a pure scatter: exact
    torch.testing.assert_close(y, opengait_set_pool(x, seqL), rtol=0, atol=0)


def test_hpp_asks_the_backends_about_one_frame(monkeypatch):
    """horizontal_pyramid_pool selects its backend with x as [N, C, 1, H, W], the shape the
    backends state their limits for: with the 4-D x the CUDA backend's limit check raised
    (not enough values to unpack) on every call on a GPU (seen on an H200)."""
    from qgait import _backend
    from qgait.ops import pooling as P

    seen = []
    real = _backend.select

    def spy(op, backends, backend, on_cpu, x, *a):
        seen.append(tuple(x.shape))
        return real(op, backends, backend, on_cpu, x, *a)

    monkeypatch.setattr(_backend, "select", spy)
    P.horizontal_pyramid_pool(torch.randn(2, 3, 16, 11), bins=(16,))
    assert seen == [(2, 3, 1, 16, 11)]
    smem = 48 * 1024
    assert P.cuda_limit_reasons((2, 3, 16, 11), 0, True, 1, smem) == []  # 4-D: one frame
    assert P.cuda_limit_reasons((1, 1, 4096, 16), 0, True, 1, smem) == \
        P.cuda_limit_reasons((1, 1, 1, 4096, 16), 0, True, 1, smem) != []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bins", [(16, 8, 4, 2, 1), (3,), (1, 2, 4, 8, 16)])
def test_hpp_matches_reference(backend, bins):
    x = rand_x((2, 3, 16, 6), kind="binary").to(device_of(backend))
    w = rand_x((2, 3, sum(bins)), seed=3).to(x.device)
    y, g = _grads(lambda t: horizontal_pyramid_pool(t, bins, backend=backend), x, w)
    y_ref, g_ref = _grads(lambda t: P.horizontal_pyramid_pool_ref(t, bins), x, w)
    _close_mean(y, y_ref, torch.float32)
    _close_mean(g, g_ref, torch.float32)
    if 16 % max(bins) == 0 and all(16 % b == 0 for b in bins):
        _close_mean(y, opengait_hpp(x, bins), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["randn", "binary"])
def test_fused_grad_equals_composed(backend, kind):
    """The fused op's gradient is that of temporal_pool then horizontal_pyramid_pool."""
    x = rand_x((1, 4, 6, 16, 5), kind=kind).to(device_of(backend))
    seqL, bins = [2, 4], (16, 8, 4, 2, 1)
    w = rand_x((2, 4, sum(bins)), seed=1).to(x.device)
    y1, g1 = _grads(lambda t: set_pool_hpp(t, seqL, bins, backend=backend), x, w)
    y2, g2 = _grads(lambda t: horizontal_pyramid_pool(temporal_pool(t, seqL, backend=backend),
                                                      bins, backend=backend), x, w)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_first_index(backend):
    x = torch.zeros(1, 1, 3, 4, 2, device=device_of(backend))  # all equal: frame 0, then
    # the first (h, w) of each strip
    x.requires_grad_()
    y = set_pool_hpp(x, None, (2,), "max", backend=backend)
    y.sum().backward()
    want = torch.zeros_like(x)
    want[0, 0, 0, 0, 0] = 1
    want[0, 0, 0, 2, 0] = 1
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    base = rand_x((2, 16, 5, 4, 3)).to(device_of(backend))  # [N, H, T, C, W] permuted to
    x = base.permute(0, 3, 2, 1, 4)                           # [N, C, T, H, W]
    assert not x.is_contiguous()
    w = rand_x((2, 4, 31), seed=2).to(x.device)
    y, g = _grads(lambda t: set_pool_hpp(t, backend=backend), x, w)
    y_ref, g_ref = _grads(lambda t: set_pool_hpp_ref(t), x, w)
    _close_mean(y, y_ref, torch.float32)
    _close_mean(g, g_ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mean+max", "max"])
def test_low_precision(backend, dtype, mode):
    x = rand_x((1, 3, 5, 16, 7), dtype=dtype).to(device_of(backend))
    seqL, bins = [2, 3], (16, 4, 1)
    w = rand_x((2, 3, sum(bins)), seed=4).to(x.device)
    y, g = _grads(lambda t: set_pool_hpp(t, seqL, bins, mode, backend=backend), x, w)
    y_ref, g_ref = _grads(lambda t: set_pool_hpp_ref(t, seqL, bins, mode), x, w)
    assert y.dtype == dtype and g.dtype == dtype
    if mode == "max":
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    else:
        _close_mean(y, y_ref, dtype)
    _close_mean(g, g_ref, dtype)


def test_every_simd_level(cpu_isa):
    """H*W = 35 has tails for every vector width; all levels agree exactly with each other's
    math (same comparisons) and with the reference."""
    x = rand_x((1, 3, 7, 5, 7), kind="few")
    seqL, bins = [3, 4], (5, 2, 1)
    w = rand_x((2, 3, 8), seed=5)
    y, g = _grads(lambda t: set_pool_hpp(t, seqL, bins, backend="cpu"), x, w)
    y_ref, g_ref = _grads(lambda t: set_pool_hpp_ref(t, seqL, bins), x, w)
    _close_mean(y, y_ref, torch.float32)
    _close_mean(g, g_ref, torch.float32)
    z, gz = _grads(lambda t: temporal_pool(t, seqL, backend="cpu"), x, rand_x((2, 3, 5, 7)))
    z_ref, gz_ref = _grads(lambda t: P.temporal_pool_ref(t, seqL), x, rand_x((2, 3, 5, 7)))
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(gz, gz_ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["randn", "binary", "nan", "signed zeros"])
@pytest.mark.parametrize("mode", ["mean+max", "max", "mean"])
@pytest.mark.parametrize("shape,seqL,bins", [
    ((2, 8, 5, 16, 11), None, (16, 8, 4, 2, 1)),
    ((1, 3, 7, 5, 7), [3, 4], (5, 2, 1)),          # H*W*C = 105: tails for every vector width
    ((1, 70, 3, 6, 5), [1, 2], (6, 3, 1)),         # channels in blocks of 64 and a tail of 6
    ((1, 16, 1, 4, 3), None, (4, 1)),              # T = 1
    ((1, 128, 4, 16, 11), [1, 3], (16, 8, 4, 2, 1)),  # the frame's max in 11 parallel parts
])
def test_channels_last_forward_without_copy(cpu_isa, kind, mode, shape, seqL, bins):
    """A channels-last fp32 x without grad (a packed conv's output) is pooled in place, not
    copied to NCDHW first; the result is bit-identical to the NCDHW path's."""
    x = rand_x(shape, kind="randn" if kind in ("nan", "signed zeros") else kind, seed=7)
    if kind == "nan":
        x.view(-1)[::13] = float("nan")
    if kind == "signed zeros":   # ties of -0.0 and +0.0: the first one kept, as torch.max
        x = torch.where(x > 0.5, 1.0, torch.where(x > 0, 0.0, -0.0))
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    assert not xc.is_contiguous()
    got = set_pool_hpp(xc, seqL, bins, mode, backend="cpu")
    want = set_pool_hpp(x, seqL, bins, mode, backend="cpu")
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    if kind != "nan":
        _close_mean(got, set_pool_hpp_ref(x, seqL, bins, mode), torch.float32)


def nan_x(shape, seed=3):
    """randn with NaNs in several frames of some positions (before, after and at the max) and,
    at one position, two NaN frames: the first must win."""
    x = rand_x(shape, seed=seed)
    x.view(-1)[5::97] = float("nan")
    if shape[2] > 2:
        x[0, 0, 1, 0, 0] = x[0, 0, -1, 0, 0] = float("nan")
    return x


NAN_CASES = [  # (shape, seqL, bins): the CPU kernel's slab, frame and tail paths
    ((1, 3, 7, 5, 7), [3, 4], (5, 2, 1)),
    ((2, 2, 6, 16, 11), None, (16, 8, 4, 2, 1)),
    ((1, 2, 1, 4, 3), None, (4, 1)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "mean+max"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", range(len(NAN_CASES)))
def test_nan_follows_torch_max(backend, mode, grad, case):
    """A NaN in a window is its max, and the max's gradient goes to the first NaN, as torch.max
    gives it; with and without indices (x requiring grad or not), on every backend."""
    shape, seqL, bins = NAN_CASES[case]
    dev = device_of(backend)
    x = nan_x(shape).to(dev)
    n_out = len(seqL) if seqL else shape[0]
    w = rand_x((n_out, shape[1], sum(bins)), seed=9).to(dev)
    if grad:
        y, g = _grads(lambda t: set_pool_hpp(t, seqL, bins, mode, backend=backend), x, w)
        y_ref, g_ref = _grads(lambda t: set_pool_hpp_ref(t, seqL, bins, mode), x, w)
        assert not g_ref.isnan().any() and g.isnan().sum() == 0
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)
    else:
        y = set_pool_hpp(x, seqL, bins, mode, backend=backend)
        y_ref = set_pool_hpp_ref(x, seqL, bins, mode)
    assert y_ref.isnan().any() and not y_ref.isnan().all()
    assert torch.equal(y.isnan(), y_ref.isnan())
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6, equal_nan=True)
    # temporal max alone: values and the arg-max frames its gradient uses
    wt = rand_x((n_out,) + shape[1:2] + shape[3:], seed=10).to(dev)
    z, gz = _grads(lambda t: temporal_pool(t, seqL, backend=backend), x, wt)
    z_ref, gz_ref = _grads(lambda t: P.temporal_pool_ref(t, seqL), x, wt)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(gz, gz_ref, rtol=0, atol=0)


def test_nan_on_every_simd_level(cpu_isa):
    """The vector bodies and scalar tails of every ISA apply the same rule (H*W = 35, and
    H*W*C = 105 on the channels-last path)."""
    shape, seqL, bins = NAN_CASES[0]
    x = nan_x(shape)
    for mode in ("max", "mean+max"):
        want = set_pool_hpp_ref(x, seqL, bins, mode)
        for xin in (x, x.contiguous(memory_format=torch.channels_last_3d)):
            got = set_pool_hpp(xin, seqL, bins, mode, backend="cpu")
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
        for dt in (torch.bfloat16, torch.float16):   # the frame-by-frame (widening) path
            got = set_pool_hpp(x.to(dt), seqL, bins, mode, backend="cpu")
            assert torch.equal(got.isnan(), want.isnan())
    y, g = _grads(lambda t: temporal_pool(t, seqL, backend="cpu"), x, rand_x((2, 3, 5, 7)))
    y_ref, g_ref = _grads(lambda t: P.temporal_pool_ref(t, seqL), x, rand_x((2, 3, 5, 7)))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_one_nan_in_a_wide_frame_and_signed_zero_ties(cpu_isa):
    """The no-index slab kernel runs MAXPS and takes only a chunk that saw a NaN again under
    torch.max's rule: in a frame of many chunks, one NaN (followed by larger numbers, which
    MAXPS alone would let through) must reach exactly its own position, the clean chunks around
    it must be exact, and ties between -0 and +0 keep the first, as torch.max(dim) does."""
    x = rand_x((1, 2, 6, 32, 41), seed=4)
    x[:, :, 0, :, :3] = -0.0
    x[:, :, 1:, :, :3] = 0.0          # a max of -0 then +0: the first (-0) stays
    x[:, :, 0, 5, 7] = -9.0           # frames after the NaN are larger
    x[:, :, 2, 5, 7] = float("nan")
    x[:, :, 3:, 5, 7] = 5.0
    for xin in (x, x.contiguous(memory_format=torch.channels_last_3d)):
        z = temporal_pool(xin, None, backend="cpu")
        want = P.temporal_pool_ref(x, None)
        assert want.isnan().sum() == 2 and torch.signbit(want[:, :, :, :3]).all()
        assert torch.equal(z.isnan(), want.isnan())
        assert torch.equal(torch.signbit(z), torch.signbit(want))
        torch.testing.assert_close(z, want, rtol=0, atol=0, equal_nan=True)
        y = set_pool_hpp(xin, None, (32, 8, 1), "max", backend="cpu")
        y_ref = set_pool_hpp_ref(x, None, (32, 8, 1), "max")
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)


def test_no_indices_without_grad():
    if not qgait.backends()["cpu"]["available"]:
        pytest.skip("qgait._C not built")
    x = rand_x((2, 3, 4, 16, 5))
    out, targ, sarg = torch.ops.qgait.set_pool_hpp(x, [], [16], 0, False)
    assert targ.numel() == 0 and sarg.numel() == 0
    out2, targ2, sarg2 = torch.ops.qgait.set_pool_hpp(x, [], [16], 0, True)
    assert targ2.shape == (2, 3, 16, 5) and sarg2.shape == (2, 3, 16)
    assert targ2.dtype == torch.int32
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    torch.testing.assert_close(targ2, x.max(dim=2)[1].int(), rtol=0, atol=0)


# ---- bad input ------------------------------------------------------------------------------
BAD = [
    (lambda: set_pool_hpp(rand_x((1, 2, 5, 16, 3)), [2, 2]), "seqL sums to 4"),
    (lambda: set_pool_hpp(rand_x((1, 2, 5, 16, 3)), [5, 0]), "must be > 0"),
    (lambda: set_pool_hpp(rand_x((1, 2, 5, 16, 3)), [6, -1]), "must be > 0"),
    (lambda: set_pool_hpp(rand_x((2, 2, 5, 16, 3)), [5]), "N must be 1"),
    (lambda: set_pool_hpp(rand_x((1, 2, 5, 16, 3)), torch.tensor([2.0, 3.0])), "integer"),
    (lambda: set_pool_hpp(rand_x((1, 2, 5, 16, 3)), None, ()), "non-empty"),
    (lambda: set_pool_hpp(rand_x((1, 2, 5, 16, 3)), None, (4, 0)), "> 0"),
    (lambda: set_pool_hpp(rand_x((1, 2, 5, 8, 3)), None, (16,)), "smaller than the largest"),
    (lambda: set_pool_hpp(rand_x((2, 5, 16, 3))), "must have 5 dims"),
    (lambda: set_pool_hpp(torch.ones(1, 2, 5, 16, 3, dtype=torch.int32)), "floating-point"),
    (lambda: set_pool_hpp(rand_x((1, 2, 5, 16, 3)), mode="sum"), "mode must be"),
    (lambda: temporal_pool(rand_x((1, 2, 5, 16, 3)), [3, 3]), "seqL sums to 6"),
    (lambda: horizontal_pyramid_pool(rand_x((1, 2, 5, 16, 3))), "must have 4 dims"),
    (lambda: horizontal_pyramid_pool(rand_x((1, 2, 4, 3))), "smaller than the largest"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_names_the_op(i):
    fn, msg = BAD[i]
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    assert "qgait::" in str(e.value) and msg in str(e.value)


def test_cpp_op_checks_name_the_op():
    if not qgait.backends()["cpu"]["available"]:
        pytest.skip("qgait._C not built")
    x = rand_x((1, 2, 5, 16, 3))
    with pytest.raises(RuntimeError, match="qgait::set_pool_hpp: seqL sums to 4"):
        torch.ops.qgait.set_pool_hpp(x, [2, 2], [16], 0, False)
    with pytest.raises(RuntimeError, match="qgait::set_pool_hpp: H=16 is smaller"):
        torch.ops.qgait.set_pool_hpp(x, [], [32], 0, False)
    with pytest.raises(RuntimeError, match="qgait::temporal_pool: x must be float32"):
        torch.ops.qgait.temporal_pool(x.double(), [], False)
    with pytest.raises(RuntimeError, match="qgait::set_pool_hpp_backward: targ must be int32"):
        torch.ops.qgait.set_pool_hpp_backward(torch.ones(1, 2, 16), torch.ones(3), torch.ones(3),
                                              [1, 2, 5, 16, 3], [], [16], 0)


# ---- torch.library: opcheck and torch.compile -----------------------------------------------
def _op_names(backend):
    suffix = "_triton" if backend == "triton" else ""
    return (getattr(torch.ops.qgait, "set_pool_hpp" + suffix).default,
            getattr(torch.ops.qgait, "temporal_pool" + suffix).default)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    sph, tp = _op_names(backend)
    utils = torch.library._OPCHECK_DEFAULT_UTILS
    if backend == "triton" and device_of(backend) == "cpu":
        # AOT tracing goes inside a triton_op and would run the interpreter on fake tensors;
        # that part of opcheck needs real Triton (a GPU).
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = rand_x((1, 3, 5, 16, 3)).to(device_of(backend))
    xg = x.clone().requires_grad_()
    opcheck = lambda op, args: torch.library.opcheck(op, args, test_utils=utils)  # noqa: E731
    opcheck(sph, (xg, [2, 3], [16, 4, 1], 0, True))
    opcheck(sph, (x, [], [8, 2], 1, False))
    opcheck(sph, (xg[:, :, :1].detach().requires_grad_(), [], [16], 2, True))
    opcheck(tp, (xg, [4, 1], True))
    opcheck(tp, (x, [], False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    if backend == "triton" and device_of(backend) == "cpu":
        pytest.skip("compiling through a triton_op traces its kernels, which the Triton "
                    "interpreter cannot do on fake tensors (needs a GPU)")
    torch._dynamo.reset()
    head = qgait.ops.SetPoolHPP(bins=(16, 8, 4, 2, 1))
    head.backend = backend

    def f(x):
        return head(x, [2, 3]) * 2.0

    x = rand_x((1, 2, 5, 16, 3)).to(device_of(backend)).requires_grad_()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    (set_pool_hpp_ref(x, [2, 3]) * 2.0).sum().backward()
    _close_mean(y.detach(), set_pool_hpp_ref(x.detach(), [2, 3]) * 2.0, torch.float32)
    _close_mean(g, x.grad, torch.float32)


def test_triton_launch_copies_no_table_to_the_device(triton_device, monkeypatch):
    """Sequence starts and strip bounds reach the Triton kernels by value: no tensor is built
    from a host list per call (a host-to-device copy syncs the host and breaks CUDA graphs)."""
    x = rand_x((1, 3, 9, 10, 5), seed=2).to(triton_device).requires_grad_()
    seqL, bins = [1, 4, 1, 3], (3, 2, 1)    # lengths 1 and a bin count not dividing H
    w = rand_x((4, 3, 6), seed=3).to(triton_device)
    wt = rand_x((4, 3, 10, 5), seed=4).to(triton_device)

    def no_host_tables(*a, **k):
        raise AssertionError("a tensor was built from host data in the Triton launch path")

    y_ref, g_ref = _grads(lambda t: set_pool_hpp_ref(t, seqL, bins), x, w)
    z_ref, gz_ref = _grads(lambda t: P.temporal_pool_ref(t, seqL), x, wt)
    with monkeypatch.context() as m:
        m.setattr(torch, "tensor", no_host_tables)
        m.setattr(torch, "as_tensor", no_host_tables)
        y, g = _grads(lambda t: set_pool_hpp(t, seqL, bins, backend="triton"), x, w)
        z, gz = _grads(lambda t: temporal_pool(t, seqL, backend="triton"), x, wt)
    _close_mean(y, y_ref, torch.float32)
    _close_mean(g, g_ref, torch.float32)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(gz, gz_ref, rtol=0, atol=0)


def test_triton_pooling_in_a_cuda_graph(triton_device):
    """No host copy per call: a forward can be captured in a CUDA graph and replayed."""
    if triton_device.type != "cuda":
        pytest.skip("CUDA graph capture needs a GPU")
    seqL, bins = [3, 1, 5], (16, 4, 1)
    x = rand_x((1, 8, 9, 16, 11), seed=5).to(triton_device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles) outside the capture
        set_pool_hpp(x, seqL, bins, backend="triton")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = set_pool_hpp(x, seqL, bins, backend="triton")
    x.copy_(rand_x(tuple(x.shape), seed=6).to(triton_device))
    graph.replay()
    torch.cuda.synchronize()
    _close_mean(y, set_pool_hpp_ref(x, seqL, bins), torch.float32)


def test_torch_compile_inductor_cpu():
    if not qgait.backends()["cpu"]["available"]:
        pytest.skip("qgait._C not built")
    torch._dynamo.reset()
    x = rand_x((2, 3, 4, 16, 5))
    f = torch.compile(lambda t: set_pool_hpp(t, bins=(16, 2), backend="cpu"), fullgraph=True)
    _close_mean(f(x), set_pool_hpp_ref(x, None, (16, 2)), torch.float32)


# ---- modules --------------------------------------------------------------------------------
def test_modules():
    x = rand_x((1, 4, 6, 16, 5))
    assert qgait.ops.SetPoolHPP(bins=(16,))(x, [2, 4]).shape == (2, 4, 16)
    assert qgait.ops.TemporalPool()(x, [2, 4]).shape == (2, 4, 16, 5)
    assert qgait.ops.HorizontalPyramidPool(bins=(4, 1), mode="max")(x[:, :, 0]).shape == (1, 4, 5)
    torch.testing.assert_close(qgait.ops.SetPoolHPP(bins=(16,), mode="max")(x, [2, 4]),
                               set_pool_hpp_ref(x, [2, 4], (16,), "max"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode"):
        qgait.ops.SetPoolHPP(mode="avg")
    with pytest.raises(ValueError, match="bins"):
        qgait.ops.SetPoolHPP(bins=())


def test_large_backward_streaming_stores(cpu_isa):
    """dx >= 8 MiB takes the non-temporal store path; H*W = 35 leaves every frame misaligned."""
    x = rand_x((1, 64, 1000, 5, 7), kind="few")
    seqL, bins = [500, 1, 499], (5, 2, 1)
    w = rand_x((3, 64, 8), seed=6)
    y, g = _grads(lambda t: set_pool_hpp(t, seqL, bins, backend="cpu"), x, w)
    y_ref, g_ref = _grads(lambda t: set_pool_hpp_ref(t, seqL, bins), x, w)
    _close_mean(g, g_ref, torch.float32)
    x1 = rand_x((64, 64, 1, 33, 37))  # T = 1: dx is a copy of dL/dz
    w1 = rand_x((64, 64, 4), seed=8)
    _, g1 = _grads(lambda t: set_pool_hpp(t, None, (3, 1), backend="cpu"), x1, w1)
    _, g1_ref = _grads(lambda t: set_pool_hpp_ref(t, None, (3, 1)), x1, w1)
    _close_mean(g1, g1_ref, torch.float32)

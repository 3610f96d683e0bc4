"""Property-based tests (hypothesis) of every op against its ``*_ref``, on random shapes (sizes
0 / 1 / small primes), non-contiguous layouts, random axes, bit widths and options; and of
random bad inputs, each of which must raise a ValueError / TypeError / RuntimeError naming the op
(never crash, never return garbage).

The draws are derandomized (the same examples every run, so CI cannot flake) and modest in
number; each test takes a few seconds on the reference CPU.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qgait
from qgait.ops import (horizontal_pyramid_pool, packed_conv3d, set_pool_hpp, set_pool_hpp_ref,
                       soft_fake_quant, temporal_pool)
from qgait.ops.pooling import horizontal_pyramid_pool_ref, temporal_pool_ref
from qgait.ops.soft_quant import quant_grid, soft_fake_quant_ref
from qgait.quant import pack_weight

# The native backends of this machine (the Triton interpreter has its own, smaller tests).
NATIVE = [b for b in ("cpu", "cuda") if qgait.backends()[b]["available"]] or [
    pytest.param("cpu", marks=pytest.mark.skip(reason=qgait.backends()["cpu"]["why"]))]
PROPS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))
# bad inputs are cheap to try: more of them (a float stride slipped through 40 examples)
BAD = settings(PROPS, max_examples=150)
SIZES = [1, 2, 3, 5, 7, 13]
SIZES0 = [0] + SIZES
LAYOUTS = ["contiguous", "strided", "permuted", "channels_last"]
ERRORS = (ValueError, TypeError, RuntimeError)


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in another memory layout (a view into a larger or permuted buffer)."""
    if t.dim() == 0 or kind == "contiguous":
        return t
    if kind == "strided":  # every other element of a twice-as-wide buffer
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan") if t.is_floating_point()
                         else 0, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "permuted":  # stored with the axes reversed
        perm = list(range(t.dim()))[::-1]
        return t.permute(perm).contiguous().permute(perm)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _shape(draw, ndim, sizes=SIZES):
    return tuple(draw(st.sampled_from(sizes)) for _ in range(ndim))


# ------------------------------------------------------------------------------ soft_fake_quant
def _sfq(backend, x, s, **kw):
    x = x.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    y = soft_fake_quant(x, s, backend=backend, **kw)
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).reshape(y.shape).to(y)
    dx, ds = torch.autograd.grad(y, (x, s), gy, allow_unused=True)
    return y.detach(), dx, ds


@pytest.mark.parametrize("backend", NATIVE)
@PROPS
@given(data=st.data())
def test_soft_fake_quant_matches_reference(backend, data):
    draw = data.draw
    ndim = draw(st.integers(0, 4))
    shape = _shape(draw, ndim, SIZES0)
    axis = draw(st.none() | st.integers(-ndim, ndim - 1)) if ndim else None
    bits, signed = draw(st.integers(2, 8)), draw(st.booleans())
    mode = draw(st.sampled_from(["hard", "soft"]))
    k = draw(st.sampled_from([0.0, 1e-4, 2.5]) | st.floats(0, 30))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    layout = draw(st.sampled_from(LAYOUTS))
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    qn, qp = quant_grid(bits, signed)
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([0.1, 1.0, 3.0, 40.0]))
    if axis is None:
        s = torch.tensor(draw(st.floats(0.01, 2.0)))
    else:
        s = torch.rand(shape[axis], generator=g) * 0.5 + 0.02
    # some elements exactly on half steps and on the clamp bounds: ties and edges
    if x.numel():
        flat = x.view(-1)
        sv = s if axis is None else s.reshape([-1] + [1] * (ndim - axis % ndim - 1)).expand(
            shape).reshape(-1)
        pick = torch.rand(flat.shape, generator=g) < 0.2
        edge = torch.randint(qn, qp + 1, flat.shape, generator=g) + 0.5 * torch.randint(
            0, 2, flat.shape, generator=g)
        flat[pick] = (edge * sv)[pick]
    dev = _device(backend)
    x = _layout(x.to(dtype).to(dev), layout)
    s = s.to(dev)
    kw = dict(bits=bits, signed=signed, axis=axis, k=k, mode=mode)
    y, dx, ds = _sfq(backend, x, s, **kw)
    yr, dxr, dsr = _sfq("reference", x, s, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    if mode == "hard":
        torch.testing.assert_close(y, yr, rtol=0, atol=0)  # bit-exact
    else:  # tanh differs by a few ulp between backends
        torch.testing.assert_close(y.float(), yr.float(), rtol=1e-5,
                                   atol=1e-6 * float(s.max()) if s.numel() else 0)
    # dx = dy * g(c), g up to (k/2) / tanh(k/2) ~ k/2: 1 - tanh^2 near the step edges cancels,
    # so its error is a few fp32 ulps of that scale (k = 29 gave 1.1e-6 absolute).
    tol = dict(rtol=1e-5, atol=1e-6 * max(1.0, k)) if dtype == torch.float32 else dict(
        rtol=1e-2, atol=1e-3 * max(1.0, k))
    torch.testing.assert_close(dx.float(), dxr.float(), **tol)
    torch.testing.assert_close(ds, dsr, rtol=1e-5, atol=1e-5 * (float(dsr.abs().max()) + 1)
                               if dsr.numel() else 0)


# ------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("backend", NATIVE)
@PROPS
@given(data=st.data())
def test_pooling_ops_match_reference(backend, data):
    draw = data.draw
    op = draw(st.sampled_from(["set_pool_hpp", "temporal_pool", "horizontal_pyramid_pool"]))
    packed = op != "horizontal_pyramid_pool" and draw(st.booleans())
    N = 1 if packed else draw(st.sampled_from(SIZES[:4]))
    C, T, H, W = _shape(draw, 4, SIZES)
    seqL = None
    if packed:  # T frames cut into random positive lengths
        cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=T - 1))) if T > 1 else []
        seqL = [b - a for a, b in zip([0] + cuts, cuts + [T])]
        if draw(st.booleans()):
            seqL = torch.tensor(seqL)
    bins = draw(st.lists(st.integers(1, H), min_size=1, max_size=3))
    mode = draw(st.sampled_from(["mean+max", "max", "mean"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    layout = draw(st.sampled_from(LAYOUTS))
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    shape = (N, C, H, W) if op == "horizontal_pyramid_pool" else (N, C, T, H, W)
    base = torch.randn(shape, generator=g)
    if draw(st.booleans()):  # coarse values: many ties for the arg-max rule
        base = torch.round(base * 2)
    x = _layout(base.to(dtype).to(_device(backend)), layout)

    def run(fn, *args, **kw):
        xx = x.detach().clone().requires_grad_(True)
        y = fn(xx, *args, **kw)
        gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y)
        (gx,) = torch.autograd.grad(y, xx, gy)
        return y.detach(), gx

    if op == "set_pool_hpp":
        y, gx = run(set_pool_hpp, seqL, bins, mode, backend=backend)
        yr, gr = run(set_pool_hpp_ref, None if seqL is None else list(map(int, seqL)), bins,
                     mode)
    elif op == "temporal_pool":
        y, gx = run(temporal_pool, seqL, backend=backend)
        yr, gr = run(temporal_pool_ref, None if seqL is None else list(map(int, seqL)))
    else:
        y, gx = run(horizontal_pyramid_pool, bins, mode, backend=backend)
        yr, gr = run(horizontal_pyramid_pool_ref, bins, mode)
    assert y.shape == yr.shape and y.dtype == x.dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    if op == "temporal_pool":  # a selection and a pure scatter: exact
        torch.testing.assert_close(y, yr, rtol=0, atol=0)
        torch.testing.assert_close(gx, gr, rtol=0, atol=0)
    elif mode == "max":  # exact maxima; an element that is the max of strips of several
        # levels sums their gradients in another order (bins [1, 1, 2]: 6e-8 apart)
        torch.testing.assert_close(y, yr, rtol=0, atol=0)
        torch.testing.assert_close(gx, gr, **tol)
    else:  # means: fp32 sums in another order (one bf16 rounding apart at most)
        torch.testing.assert_close(y, yr, **tol)
        torch.testing.assert_close(gx, gr, **tol)


# ------------------------------------------------------------------------------ packed_conv3d
def _conv_case(draw, device):
    """Random packed_conv3d arguments (the output may be empty: then it must be an error)."""
    n, ci, co = draw(st.sampled_from([1, 2])), draw(st.sampled_from(SIZES[:5])), \
        draw(st.sampled_from(SIZES[:5]))
    k = _shape(draw, 3, [1, 2, 3])
    stride = draw(st.sampled_from([1, 2]) | st.tuples(*[st.integers(1, 2)] * 3))
    padding = draw(st.sampled_from([0, 1]) | st.tuples(*[st.integers(0, 2)] * 3))
    dilation = draw(st.sampled_from([1, 2]) | st.tuples(*[st.integers(1, 2)] * 3))
    thw = _shape(draw, 3, [1, 2, 3, 5, 7])
    w_bits = draw(st.sampled_from([4, 8]))
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    lo, hi = (-8, 7) if w_bits == 4 else (-128, 127)
    w_int = torch.randint(lo, hi + 1, (co, ci, *k), generator=g)
    kw = dict(w_bits=w_bits, c_in=ci, stride=stride, padding=padding, dilation=dilation)
    kind = draw(st.sampled_from(["float", "int8", "uint8", "bool"]))
    in_bits = draw(st.integers(2, 8))
    if kind == "float":
        in_signed = draw(st.booleans())
        x = torch.randn(n, ci, *thw, generator=g) * 3
        kw.update(x_scale=torch.tensor(draw(st.floats(0.005, 1.0))), in_bits=in_bits,
                  in_signed=in_signed)
    elif kind == "bool":
        x = torch.rand(n, ci, *thw, generator=g) < 0.5
    else:  # codes already on the in_bits grid
        in_signed = kind == "int8"
        qn, qp = quant_grid(in_bits, in_signed)
        x = torch.randint(qn, qp + 1, (n, ci, *thw), generator=g).to(getattr(torch, kind))
        kw.update(x_scale=torch.tensor(0.25), in_bits=in_bits, in_signed=in_signed)
    kw["act"] = draw(st.sampled_from(["none", "relu", "leaky_relu"]))
    kw["neg_slope"] = draw(st.sampled_from([0.01, 0.1, 0.3]))
    kw["out"] = draw(st.sampled_from(["float", "quant", "acc"]))
    if kw["out"] == "quant":
        kw.update(out_scale=torch.tensor(draw(st.floats(0.01, 2.0))),
                  out_bits=draw(st.integers(2, 8)), out_signed=draw(st.booleans()))
    if draw(st.booleans()):
        kw["bias"] = torch.randn(co, generator=g)
    if draw(st.booleans()):
        kw["bn_scale"] = torch.rand(co, generator=g) + 0.5
        kw["bn_shift"] = torch.randn(co, generator=g)
    w_scale = torch.rand(co, generator=g) * 0.02 + 1e-3
    x = _layout(x, draw(st.sampled_from(LAYOUTS)))
    kw = {key: v.to(device) if torch.is_tensor(v) else v for key, v in kw.items()}
    return x.to(device), pack_weight(w_int, w_bits).to(device), w_scale.to(device), kw


def _conv_out_empty(x, wp, kw):
    def trip(v):
        return (v,) * 3 if isinstance(v, int) else v
    s, p, d = trip(kw["stride"]), trip(kw["padding"]), trip(kw["dilation"])
    return any((x.shape[2 + i] + 2 * p[i] - d[i] * (wp.shape[1 + i] - 1) - 1) // s[i] + 1 < 1
               for i in range(3))


@pytest.mark.parametrize("backend", NATIVE)
@PROPS
@given(data=st.data())
def test_packed_conv3d_matches_reference(backend, data):
    x, wp, ws, kw = _conv_case(data.draw, _device(backend))
    if _conv_out_empty(x, wp, kw):
        with pytest.raises(ValueError, match="qgait::packed_conv3d: input .* too small"):
            packed_conv3d(x, wp, ws, backend=backend, **kw)
        return
    y = packed_conv3d(x, wp, ws, backend=backend, **kw)
    yr = packed_conv3d(x, wp, ws, backend="reference", **kw)
    assert y.shape == yr.shape and y.dtype == yr.dtype
    # integers exact, and the same fp32 epilogue in the same order: bit for bit
    assert torch.equal(y, yr), (y - yr).abs().max() if y.is_floating_point() else None


# ------------------------------------------------------------------------------ bad inputs
def _nonfinite_or_bad_number():
    return st.sampled_from([-1.0, 0.0, float("nan"), float("inf"), -float("inf")])


@BAD
@given(data=st.data())
def test_soft_fake_quant_bad_inputs_raise_naming_the_op(data):
    draw = data.draw
    x = torch.randn(_shape(draw, draw(st.integers(1, 3))))
    good = dict(scale=torch.tensor(0.1), bits=4, signed=True, axis=None, k=0.0, mode="hard")
    what = draw(st.sampled_from(["bits", "axis", "scale_shape", "scale_value", "k", "mode",
                                 "x_dtype", "scale_dtype", "x_type"]))
    kw = dict(good)
    if what == "bits":
        kw["bits"] = draw(st.sampled_from([0, 1, 9, 16, -3, 2.5, True, "4", None]))
    elif what == "axis":
        kw["axis"] = draw(st.sampled_from([x.dim(), -x.dim() - 1, 100, 1.0, "0"]))
        kw["scale"] = torch.full((x.shape[0],), 0.1)
    elif what == "scale_shape":
        kw["axis"] = draw(st.sampled_from([None, 0]))
        kw["scale"] = torch.full((x.shape[0] + 1, 2), 0.1)
    elif what == "scale_value":
        kw["scale"] = torch.tensor(draw(_nonfinite_or_bad_number()))
    elif what == "k":
        kw["k"] = draw(_nonfinite_or_bad_number().filter(lambda v: not v >= 0 or math.isinf(v))
                       | st.sampled_from([True, "2", None]))
    elif what == "mode":
        kw["mode"] = draw(st.sampled_from(["soft ", "HARD", "", None, 1]))
    elif what == "x_dtype":
        x = draw(st.sampled_from([x.to(torch.int32), x.bool(), x.to(torch.uint8)]))
    elif what == "scale_dtype":
        kw["scale"] = torch.tensor(1, dtype=draw(st.sampled_from([torch.int64, torch.bool])))
    else:
        x = x.tolist()
    with pytest.raises(ERRORS, match="soft_fake_quant"):
        soft_fake_quant(x, **kw)


@BAD
@given(data=st.data())
def test_pooling_bad_inputs_raise_naming_the_op(data):
    draw = data.draw
    op = draw(st.sampled_from([set_pool_hpp, temporal_pool, horizontal_pyramid_pool]))
    name = op.__name__
    rank = 4 if op is horizontal_pyramid_pool else 5
    shape = list(_shape(draw, rank))
    what = draw(st.sampled_from(["rank", "empty", "dtype", "seqL", "bins", "mode"]))
    kw = {}
    if what == "rank":
        shape = shape[:draw(st.sampled_from([0, 1, 2, 3]))] + ([1, 2] if draw(st.booleans())
                                                                else [])
        shape = shape if len(shape) != rank else shape + [1]
    elif what == "empty":
        shape[draw(st.integers(0, rank - 1))] = 0
    x = torch.randn(shape)
    if what == "dtype":
        x = x.to(draw(st.sampled_from([torch.int64, torch.uint8, torch.bool])))
    elif what == "seqL":
        if op is horizontal_pyramid_pool:
            return
        T = shape[2]
        kw["seqL"] = draw(st.sampled_from([[T + 1], [0, T], [-1, T + 1], [], [float(T)],
                                           [T, 0], "T", torch.tensor([float(T)]),
                                           torch.tensor([[T]])]))
        if shape[0] == 1 and kw["seqL"] == [T]:
            return
    elif what == "bins":
        if op is temporal_pool:
            return
        H = shape[-2]
        kw["bins"] = draw(st.sampled_from([[H + 1], [0], [], [-2], [1.5], [True], "16", None]))
    elif what == "mode":
        if op is temporal_pool:
            return
        kw["mode"] = draw(st.sampled_from(["sum", "MAX", "", None]))
    with pytest.raises(ERRORS, match=name):
        op(x, **kw)


@BAD
@given(data=st.data())
def test_packed_conv3d_bad_inputs_raise_naming_the_op(data):
    draw = data.draw
    x, wp, ws, kw = _conv_case(draw, "cpu")
    what = draw(st.sampled_from(["w_dtype", "c_in", "w_bits", "stride", "padding", "dilation",
                                 "x_rank", "x_dtype", "w_scale", "x_scale", "act", "out",
                                 "bn_half", "bias", "in_bits", "too_small"]))
    if what == "w_dtype":
        wp = wp.to(torch.int32)
    elif what == "c_in":
        kw["c_in"] = kw["c_in"] + draw(st.sampled_from([1, 2]))
    elif what == "w_bits":
        kw["w_bits"] = draw(st.sampled_from([2, 3, 5, 16, 0]))
    elif what in ("stride", "dilation"):
        kw[what] = draw(st.sampled_from([0, -1, (1, 1), (1, 0, 1), 1.5]))
    elif what == "padding":
        kw[what] = draw(st.sampled_from([-1, (0, -1, 0), (1, 1), "same"]))
    elif what == "x_rank":
        x = x.reshape(x.shape[0], x.shape[1], -1)
    elif what == "x_dtype":
        x = x.to(draw(st.sampled_from([torch.float64, torch.int32, torch.float16])))
        kw.setdefault("x_scale", torch.tensor(0.1))
    elif what == "w_scale":
        ws = draw(st.sampled_from([ws[:-1] if ws.numel() > 1 else ws.repeat(2), ws.double(),
                                   -ws, ws * float("nan")]))
    elif what == "x_scale":
        if "x_scale" not in kw:
            return
        kw["x_scale"] = draw(st.sampled_from([torch.tensor(0.0), torch.tensor(float("inf")),
                                              torch.ones(2), torch.tensor(1, dtype=torch.int32)]))
    elif what == "act":
        kw["act"] = draw(st.sampled_from(["gelu", "", None]))
    elif what == "out":
        kw["out"] = draw(st.sampled_from(["int", "quant", None]))
        kw.pop("out_scale", None)
    elif what == "bn_half":
        kw.pop("bn_shift", None)
        kw["bn_scale"] = torch.ones(wp.shape[0])
    elif what == "bias":
        kw["bias"] = torch.ones(wp.shape[0] + 1)
    elif what == "in_bits":
        if "x_scale" not in kw:
            return
        kw["in_bits"] = draw(st.sampled_from([1, 9, 0]))
    else:
        kw.update(padding=0, dilation=2, stride=1)
        x = x[:, :, :1, :1, :1]
        if max(wp.shape[1:4]) == 1:
            return
    with pytest.raises(ERRORS, match="packed_conv3d"):
        packed_conv3d(x, wp, ws, **kw)


@pytest.mark.parametrize("arg,value", [("stride", 1.5), ("stride", "2"), ("padding", 0.5),
                                       ("dilation", None), ("stride", True),
                                       ("padding", (0, 1.0, 0))])
def test_packed_conv3d_geometry_that_is_not_ints(arg, value):
    """Found by the property test above: a float stride raised a bare "'float' object is not
    iterable" TypeError; every non-int geometry now names the op and the argument."""
    x = torch.rand(1, 2, 3, 3, 3)
    wp = pack_weight(torch.ones(4, 2, 1, 1, 1, dtype=torch.int8), 8)
    with pytest.raises(ValueError, match=f"qgait::packed_conv3d: {arg} must be an int or 3 ints"):
        packed_conv3d(x, wp, torch.ones(4), w_bits=8, c_in=2, x_scale=torch.tensor(0.1),
                      **{arg: value})

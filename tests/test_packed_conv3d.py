"""packed_conv3d: every backend (and CPU ISA level) against the exact reference; packing; the
fused epilogue against an independent float64 computation; binary input; bad input."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from qgait import _ext
from qgait.ops import PackedConv3d, packed_conv3d
from qgait.quant import pack_weight, unpack_weight

from conftest import backend_params, device_of

# (N, C_in, C_out, (T, H, W), kernel, stride, padding, dilation)
CASES = [
    (1, 3, 5, (3, 5, 6), (3, 3, 3), 1, 1, 1),
    (1, 1, 16, (2, 6, 5), (1, 3, 3), 1, 1, 1),            # C_in = 1 (a silhouette layer)
    (2, 7, 17, (5, 4, 4), (3, 1, 1), 2, 0, 1),            # odd C_in / C_out, stride 2
    (1, 9, 33, (1, 5, 7), (1, 1, 1), 1, 0, 1),            # T = 1, pointwise
    (1, 20, 70, (4, 7, 9), (3, 3, 3), 2, 1, 2),           # dilation 2, C_out over one tile
    (1, 36, 8, (3, 4, 13), (3, 3, 3), (1, 2, 1), (1, 0, 1), (2, 1, 1)),  # mixed per axis
    (1, 13, 9, (2, 3, 37), (1, 3, 3), 1, 1, 1),           # W over three 16-pixel blocks
    # C_in = 1 folds the W taps into the 4-byte steps (kW <= 4, W undilated)
    (2, 1, 18, (3, 9, 11), (3, 3, 3), (1, 2, 2), 1, 1),   # the stem: stride 2 in H / W
    (1, 1, 5, (2, 4, 9), (2, 2, 4), 1, (1, 0, 2), 1),     # kW = 4: all 4 slots, no H padding
    (1, 1, 7, (2, 5, 8), (1, 3, 3), 1, 1, (1, 1, 2)),     # W dilated: not folded
    # rows whose window lies partly or wholly in the T / H padding (the vnni path skips those
    # taps and corrects the zero point with the valid ones' weights only)
    (1, 8, 20, (2, 4, 6), (3, 3, 3), 1, (2, 2, 1), 1),
    (1, 4, 6, (2, 3, 5), (1, 1, 1), 1, (1, 1, 0), 1),     # rows of padding only
    # the AVX-512 wide tiles (up to 12 pixels x 1 or 2 blocks of 16 channels): rows of 23, 19
    # and 15 pixels cut into tiles of 12 + 11, 10 + 9 and 8 + 7
    (1, 6, 32, (2, 3, 23), (1, 3, 3), 1, 1, 1),
    (1, 5, 24, (2, 2, 19), (3, 3, 3), 1, 1, 1),           # the second block masked
    (1, 4, 30, (1, 2, 15), (1, 1, 3), 1, (0, 0, 1), 1),
    (1, 3, 12, (1, 2, 23), (1, 3, 3), 1, 1, 1),           # one block
]
TINY = [  # for the Triton interpreter
    (1, 3, 5, (2, 3, 4), (3, 3, 3), 1, 1, 1),
    (1, 5, 3, (3, 4, 3), (3, 1, 1), 2, 0, 1),
    (1, 2, 4, (1, 5, 5), (1, 3, 3), 1, 1, 2),
]
INPUTS = ["float_unsigned", "float_signed", "int8", "uint8", "bool"]


def _ids(cases):
    return [f"n{c[0]}c{c[1]}o{c[2]}k{''.join(map(str, c[4]))}s{c[5]}p{c[6]}d{c[7]}"
            for c in cases]


def make_case(case, w_bits, kind, seed=0, device="cpu"):
    """Random weights on the w_bits grid and an input of the given kind."""
    n, ci, co, (t, h, w), k, s, p, d = case
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-128, 127) if w_bits == 8 else (-8, 7)
    w_int = torch.randint(lo, hi + 1, (co, ci, *k), generator=g)
    kw = dict(w_bits=w_bits, c_in=ci, stride=s, padding=p, dilation=d)
    if kind.startswith("float"):
        x = torch.randn(n, ci, t, h, w, generator=g) * 3
        if kind == "float_unsigned":
            x = x.abs()
        kw.update(x_scale=torch.tensor(0.021), in_signed=kind == "float_signed")
    elif kind == "int8":
        x = torch.randint(-128, 128, (n, ci, t, h, w), generator=g).to(torch.int8)
        kw.update(x_scale=torch.tensor(0.5), in_signed=True)
    elif kind == "uint8":
        x = torch.randint(0, 256, (n, ci, t, h, w), generator=g).to(torch.uint8)
        kw.update(x_scale=torch.tensor(0.5), in_signed=False)
    else:
        x = torch.rand(n, ci, t, h, w, generator=g) < 0.5
    w_scale = torch.rand(co, generator=g) * 0.02 + 1e-3
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return x.to(device), pack_weight(w_int, w_bits).to(device), w_scale.to(device), kw


# ---- packing --------------------------------------------------------------------------------
def test_int4_pack_roundtrip_all_values():
    vals = torch.arange(-8, 8)
    # every (low, high) pair of values, C_in even, plus an odd C_in
    lo, hi = torch.meshgrid(vals, vals, indexing="ij")
    w = torch.stack((lo.flatten(), hi.flatten()), dim=1).reshape(256, 2, 1, 1, 1)
    packed = pack_weight(w, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1, 1, 1, 1)
    # the lower-indexed channel sits in the low nibble (two's complement nibbles)
    expect = [(int(a) & 0xF) | ((int(b) & 0xF) << 4) for a, b in zip(lo.flatten(), hi.flatten())]
    assert packed.flatten().tolist() == expect
    assert torch.equal(unpack_weight(packed, 4, 2), w.to(torch.int8))
    w3 = torch.randint(-8, 8, (4, 3, 2, 1, 3))
    p3 = pack_weight(w3, 4)
    assert p3.shape == (4, 2, 1, 3, 2) and bool((p3[..., 1] >> 4 == 0).all())  # odd pad is 0
    assert torch.equal(unpack_weight(p3, 4, 3), w3.to(torch.int8))


def test_int8_pack_layout():
    w = torch.randint(-128, 128, (5, 3, 2, 3, 4))
    p = pack_weight(w, 8)
    assert p.dtype == torch.int8 and p.shape == (5, 2, 3, 4, 3)
    assert int(p[4, 1, 2, 3, 1]) == int(w[4, 1, 1, 2, 3])
    assert torch.equal(unpack_weight(p, 8, 3), w.to(torch.int8))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="qgait::pack_weight"):
        pack_weight(torch.full((1, 1, 1, 1, 1), 8), 4)


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] != "cpu"])
def test_gpu_backends_take_cpu_scalar_steps(backend):
    """x_scale / out_scale as 0-dim CPU tensors beside CUDA x (torch's scalar-tensor rule, and
    the docstring's example); the per-channel w_scale must be on x's device."""
    dev = device_of(backend)
    if dev != "cuda":
        pytest.skip("needs a CUDA device (on the CPU every tensor is already on x's device)")
    x, wp, ws, kw = make_case(TINY[0], 8, "float_unsigned", device=dev)
    kw["x_scale"] = kw["x_scale"].cpu()
    got = packed_conv3d(x, wp, ws, out="quant", out_scale=torch.tensor(0.07), backend=backend,
                        **kw)
    want = packed_conv3d(x.cpu(), wp.cpu(), ws.cpu(), out="quant", out_scale=torch.tensor(0.07),
                         backend="reference", **kw)
    assert got.device == x.device and torch.equal(got.cpu(), want)


# ---- exact integer accumulators -------------------------------------------------------------
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_cpu_acc_exact(cpu_isa, case, w_bits, kind):
    x, wp, ws, kw = make_case(case, w_bits, kind)
    got = packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw)
    ref = packed_conv3d(x, wp, ws, out="acc", backend="reference", **kw)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] != "cpu"])
@pytest.mark.parametrize("kind", ["float_signed", "uint8", "bool"])
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", TINY, ids=_ids(TINY))
def test_gpu_backends_acc_exact(backend, case, w_bits, kind):
    dev = device_of(backend)
    x, wp, ws, kw = make_case(case, w_bits, kind, device=dev)
    got = packed_conv3d(x, wp, ws, out="acc", backend=backend, **kw)
    ref = packed_conv3d(x.cpu(), wp.cpu(), ws.cpu(),
                        **{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                           for k, v in kw.items()}, out="acc", backend="reference")
    assert torch.equal(got.cpu(), ref)


def test_reference_acc_is_integer_conv():
    """The reference against an independent int64 loop on a tiny case."""
    x, wp, ws, kw = make_case((1, 2, 3, (2, 3, 3), (2, 2, 2), 1, 1, 1), 4, "int8")
    acc = packed_conv3d(x, wp, ws, out="acc", backend="reference", **kw)
    w = unpack_weight(wp, 4, 2).long()
    xp = F.pad(x.long(), (1, 1, 1, 1, 1, 1))
    for o in range(3):
        for t in range(acc.shape[2]):
            for h in range(acc.shape[3]):
                for v in range(acc.shape[4]):
                    s = int((xp[0, :, t:t + 2, h:h + 2, v:v + 2] * w[o]).sum())
                    assert int(acc[0, o, t, h, v]) == s


# ---- the AVX2-class kernels' range choice (vpmaddubsw with int16 sums where exact) --------
# Each row drives one kernel to the edge of its exactness bound: every code at its maximum (or
# the input at its most negative code) against weights all at one extreme, so a chunk of int16
# sums one step longer than the bound allows would wrap, and a pair sum that could saturate
# would. (w_bits, weight value, input kind, code-range args): the kernel it selects on AVX2.
RANGE_CASES = [
    (4, -8, ("uint8", 255, {}), "maddubs, W4A8: L = 8"),
    (4, 7, ("uint8", 255, {}), "maddubs, W4A8 positive"),
    (8, -128, ("float", 15.0, dict(in_bits=4)), "maddubs, W8A4: L = 8"),
    (8, 127, ("float", 15.0, dict(in_bits=4)), "maddubs, W8A4 positive"),
    (4, -8, ("float", 7.0, dict(in_bits=4, in_signed=True)), "maddubs, W4A4: L = 136"),
    (4, -8, ("float", -8.0, dict(in_bits=4, in_signed=True)), "maddubs, W4A4 lowest code"),
    (8, -128, ("uint8", 128, {}), "maddubs1, W8 with codes <= 128: L = 1"),
    (8, 127, ("uint8", 128, {}), "maddubs1 positive"),
    (8, -128, ("uint8", 255, {}), "madd16, W8A8"),
    (8, -128, ("int8", -128, dict(in_signed=True)), "madd16, int8 codes at -128"),
    (8, 127, ("int8", 7, dict(in_signed=True, in_bits=4)), "maddubs, int8 codes in [-8, 7]"),
]
RANGE_SHAPES = [
    (1, 36, 17, (3, 4, 13), (3, 3, 3), 1, 1, 1),     # K = 27 * 9 = 243 steps > 136
    (2, 5, 33, (2, 3, 6), (3, 3, 3), (1, 2, 1), 1, 1),  # C_in padded, C_out tail, stride
]


@pytest.mark.parametrize("shape", RANGE_SHAPES, ids=_ids(RANGE_SHAPES))
@pytest.mark.parametrize("w_bits,wv,inp,what", RANGE_CASES, ids=[c[3] for c in RANGE_CASES])
def test_cpu_code_range_extremes_exact(cpu_isa, shape, w_bits, wv, inp, what):
    n, ci, co, (t, h, w), k, st, pd, dl = shape
    kind, v, extra = inp
    g = torch.Generator().manual_seed(3)
    w_int = torch.full((co, ci, *k), wv)
    w_int[0] = torch.randint(-8 if w_bits == 4 else -128, 8 if w_bits == 4 else 128, (ci, *k),
                             generator=g)  # one channel of mixed signs
    kw = dict(w_bits=w_bits, c_in=ci, stride=st, padding=pd, dilation=dl, **extra)
    if kind == "float":
        x = torch.full((n, ci, t, h, w), v * 0.25)
        kw["x_scale"] = torch.tensor(0.25)
    else:
        x = torch.full((n, ci, t, h, w), v, dtype=torch.uint8 if kind == "uint8" else torch.int8)
        kw["x_scale"] = torch.tensor(0.5)
    x[..., 0] = x[..., 0] * 0  # a column of zero codes too
    wp = pack_weight(w_int, w_bits)
    ws = torch.rand(co, generator=g) * 0.02 + 1e-3
    got = packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw)
    ref = packed_conv3d(x, wp, ws, out="acc", backend="reference", **kw)
    assert torch.equal(got, ref), what
    # and a random input over the same code range, with every epilogue
    xr = (torch.rand(x.shape, generator=g) * (v if kind != "int8" else 1.0)).to(x.dtype)
    if kind == "int8":
        xr = torch.randint(min(v, 0), max(v, 0) + 1, x.shape, generator=g).to(torch.int8)
    for out in ("float", "quant"):
        args = dict(kw, act="leaky_relu", out=out, out_scale=torch.tensor(0.3), **_epilogue_args(co))
        assert torch.equal(packed_conv3d(xr, wp, ws, backend="cpu", **args),
                           packed_conv3d(xr, wp, ws, backend="reference", **args)), what


@pytest.mark.parametrize("view", ["channels_last_slice", "strided"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float32])
def test_cpu_code_range_measured_on_views(cpu_isa, view, dtype):
    """The AVX2 range choice measures the input over its memory block when the input is dense
    in any stride order (a flat view), else over the tensor: a batch slice of a channels-last
    map (dense, at a storage offset) and a strided slice (not dense), each with its extreme
    codes only in its last sequence, so a view off by the offset, or over the wrong block,
    misses them: the codes wrap, or int16 sums chosen too long for them overflow."""
    g = torch.Generator().manual_seed(5)
    big = torch.randint(0, 8, (3, 6, 4, 5, 7), generator=g).to(dtype)
    big = big.contiguous(memory_format=torch.channels_last_3d)
    x = big[1:] if view == "channels_last_slice" else big[:, :, ::2]
    x[-1] = 127 if dtype == torch.int8 else 255 if dtype == torch.uint8 else 60.0  # 240 at 0.25
    if dtype == torch.int8:
        x[-1, :3] = -128
    assert x.is_contiguous(memory_format=torch.channels_last_3d) == (view == "channels_last_slice")
    w_int = torch.full((9, 6, 3, 3, 3), -8)
    w_int[0] = torch.randint(-8, 8, (6, 3, 3, 3), generator=g)
    kw = dict(w_bits=4, c_in=6, stride=1, padding=1, dilation=1, x_scale=torch.tensor(0.25),
              in_signed=dtype == torch.int8)
    wp, ws = pack_weight(w_int, 4), torch.rand(9, generator=g) * 0.02 + 1e-3
    assert torch.equal(packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw),
                       packed_conv3d(x, wp, ws, out="acc", backend="reference", **kw))


@pytest.mark.parametrize("w_bits", [8, 4])
def test_cpu_prepared_weights_follow_their_bytes(cpu_isa, w_bits):
    """The CPU op keeps each layer's prepared weights between calls, looked up by their bytes:
    repeated calls, weights changed in place (same tensor and address; all of them, then only
    the last byte) and equal weights in another tensor all give the reference's result."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 200, (1, 8, 3, 5, 6), generator=g).to(torch.uint8)
    lim = 8 if w_bits == 4 else 128
    w_int = torch.randint(-lim, lim, (20, 8, 3, 3, 3), generator=g)
    wp = pack_weight(w_int, w_bits)
    ws = torch.rand(20, generator=g) * 0.02 + 1e-3
    kw = dict(w_bits=w_bits, c_in=8, stride=1, padding=1, dilation=1, x_scale=torch.tensor(0.5))

    def check(w):
        for out in ("acc", "float"):
            assert torch.equal(packed_conv3d(x, w, ws, out=out, backend="cpu", **kw),
                               packed_conv3d(x, w, ws, out=out, backend="reference", **kw))

    check(wp)
    check(wp)
    ptr = wp.data_ptr()
    wp.copy_(pack_weight(torch.randint(-lim, lim, w_int.shape, generator=g), w_bits))
    check(wp)
    flat = wp.view(-1)
    flat[-1] = flat[-1] ^ 0x35
    assert wp.data_ptr() == ptr
    check(wp)
    check(wp.clone())


def test_avx_vnni_path_exact():
    """The AVX-VNNI (VEX vpdpbusd) kernel, which the avx2_vnni level uses on CPUs reporting
    avx_vnni (the plain avx2 level keeps to vpmaddubsw / vpmaddwd)."""
    import qgait

    feats = torch.ops.qgait._cpu_features()
    if "avx_vnni=1" not in feats:
        pytest.skip(f"this CPU has no AVX-VNNI ({feats}); its kernel is compiled but cannot run")
    qgait.set_cpu_isa("avx2")
    try:
        x, wp, ws, kw = make_case(CASES[0], 8, "uint8")
        packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw)
        assert torch.ops.qgait._packed_conv3d_cpu_path() != "avx2-avxvnni"
        assert qgait.set_cpu_isa("avx2_vnni") == "avx2"
        for case in CASES + RANGE_SHAPES:
            for w_bits in (8, 4):
                for kind in INPUTS:
                    x, wp, ws, kw = make_case(case, w_bits, kind)
                    assert torch.equal(packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw),
                                       packed_conv3d(x, wp, ws, out="acc", backend="reference",
                                                     **kw))
                    assert torch.ops.qgait._packed_conv3d_cpu_path() in (
                        "avx2-avxvnni", "avx2-avxvnni-winograd")
        assert torch.ops.qgait._cpu_isa() == "avx2_vnni"
    finally:
        qgait.set_cpu_isa("amx")


# ---- fused epilogue -------------------------------------------------------------------------
def _epilogue_args(co, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(bias=torch.randn(co, generator=g), bn_scale=torch.rand(co, generator=g) + 0.5,
                bn_shift=torch.randn(co, generator=g))


def _float64_truth(x, wp, ws, kw, bias, bn_scale, bn_shift, act, slope):
    """Dequantized float64 convolution + affine + activation (independent of the op)."""
    xs = kw["x_scale"].double()
    qn, qp = (-128, 127) if kw["in_signed"] else (0, 255)
    xq = torch.round(torch.clamp(x.double() * (1.0 / kw["x_scale"]).double(), qn, qp)) * xs
    w = unpack_weight(wp, kw["w_bits"], kw["c_in"]).double() * ws.double().reshape(-1, 1, 1, 1, 1)
    z = F.conv3d(xq, w, bias.double(), kw["stride"], kw["padding"], kw["dilation"])
    z = z * bn_scale.double().reshape(1, -1, 1, 1, 1) + bn_shift.double().reshape(1, -1, 1, 1, 1)
    return F.relu(z) if act == "relu" else F.leaky_relu(z, slope) if act == "leaky_relu" else z


@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_epilogue_float_matches_float64(cpu_isa, w_bits, act):
    case = CASES[4]
    x, wp, ws, kw = make_case(case, w_bits, "float_signed")
    ep = _epilogue_args(case[2])
    y = packed_conv3d(x, wp, ws, act=act, neg_slope=0.1, backend="cpu", **ep, **kw)
    truth = _float64_truth(x, wp, ws, kw, **ep, act=act, slope=0.1)
    scale = truth.abs().max()
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), truth, rtol=1e-5, atol=1e-5 * float(scale))
    # and bit for bit with the reference's fp32 epilogue
    ref = packed_conv3d(x, wp, ws, act=act, neg_slope=0.1, backend="reference", **ep, **kw)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("out_signed", [False, True])
@pytest.mark.parametrize("out_bits", [8, 4])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_requantized_output_exact(cpu_isa, w_bits, out_bits, out_signed):
    case = CASES[0]
    x, wp, ws, kw = make_case(case, w_bits, "float_unsigned")
    ep = _epilogue_args(case[2])
    args = dict(act="leaky_relu", out="quant", out_scale=torch.tensor(0.07), out_bits=out_bits,
                out_signed=out_signed, **ep, **kw)
    y = packed_conv3d(x, wp, ws, backend="cpu", **args)
    ref = packed_conv3d(x, wp, ws, backend="reference", **args)
    assert y.dtype == (torch.int8 if out_signed else torch.uint8)
    assert torch.equal(y, ref)
    lo, hi = (-(2 ** (out_bits - 1)), 2 ** (out_bits - 1) - 1) if out_signed else (0, 2**out_bits - 1)
    assert int(y.min()) >= lo and int(y.max()) <= hi and int(y.max()) > int(y.min())


def test_integer_chain_equals_reference_chain(cpu_isa):
    """Two layers passing uint8 codes: equal to the reference run the same way."""
    x, wp1, ws1, kw1 = make_case((1, 4, 6, (3, 5, 5), (3, 3, 3), 1, 1, 1), 4, "float_unsigned")
    g = torch.Generator().manual_seed(5)
    wp2 = pack_weight(torch.randint(-128, 128, (5, 6, 1, 3, 3), generator=g), 8)
    ws2, s2 = torch.rand(5, generator=g) * 0.01 + 1e-3, torch.tensor(0.03)
    outs = []
    for b in ("cpu", "reference"):
        h = packed_conv3d(x, wp1, ws1, act="relu", out="quant", out_scale=s2, backend=b, **kw1)
        outs.append(packed_conv3d(h, wp2, ws2, w_bits=8, c_in=6, x_scale=s2, padding=(0, 1, 1),
                                  backend=b))
    assert torch.equal(outs[0], outs[1])


def test_binary_input_bool_and_uint8(cpu_isa):
    case = (2, 1, 16, (4, 9, 7), (3, 3, 3), 1, 1, 1)
    x, wp, ws, kw = make_case(case, 4, "bool")
    ep = _epilogue_args(16)
    y_bool = packed_conv3d(x, wp, ws, backend="cpu", **ep, **kw)
    y_u8 = packed_conv3d(x.to(torch.uint8), wp, ws, backend="cpu", **ep, **kw)
    w = unpack_weight(wp, 4, 1).float() * ws.reshape(-1, 1, 1, 1, 1)
    z = F.conv3d(x.double(), w.double(), ep["bias"].double(), padding=1)
    truth = z * ep["bn_scale"].double().reshape(1, -1, 1, 1, 1) \
        + ep["bn_shift"].double().reshape(1, -1, 1, 1, 1)
    assert torch.equal(y_bool, y_u8)
    torch.testing.assert_close(y_bool.double(), truth, rtol=1e-5, atol=1e-5 * float(truth.abs().max()))


def test_channels_last_input_same_result():
    x, wp, ws, kw = make_case(CASES[2], 8, "float_signed")
    a = packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw)
    b = packed_conv3d(x.contiguous(memory_format=torch.channels_last_3d), wp, ws, out="acc",
                      backend="cpu", **kw)
    c = packed_conv3d(x.transpose(3, 4).contiguous().transpose(3, 4), wp, ws, out="acc",
                      backend="cpu", **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


LAYOUT_CASES = [
    (1, 8, 16, (3, 5, 6), (3, 3, 3), 1, 1, 1),             # C_in = the buffer's channel width
    (2, 12, 9, (2, 4, 7), (1, 3, 3), 1, (0, 2, 1), 1),     # pad differs per axis
    (2, 8, 5, (4, 5, 6), (3, 3, 3), 1, (2, 0, 0), 1),      # no H / W halo, T halo only
    (1, 1, 6, (2, 5, 7), (3, 3, 3), (1, 2, 2), 1, 1),      # C_in = 1, W taps folded
    (1, 5, 7, (3, 4, 5), (3, 3, 3), 1, 1, 1),              # C_in padded to 8 in the buffer
]


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=_ids(LAYOUT_CASES))
def test_input_layouts_over_a_dirty_buffer(cpu_isa, case, kind):
    """Every input layout gives the exact accumulators, also when the reused code buffer holds
    another call's codes: padding, channel tail and interior copies (whole rows, pixels, frames)
    must leave nothing of them behind."""
    x, wp, ws, kw = make_case(case, 8, kind)
    ref = packed_conv3d(x, wp, ws, out="acc", backend="reference", **kw)
    big = torch.full((2, case[1], 6, 12, 12), 255, dtype=torch.uint8)
    for layout in (x, x.contiguous(memory_format=torch.channels_last_3d),
                   x.transpose(3, 4).contiguous().transpose(3, 4)):
        packed_conv3d(big, wp, ws, out="acc", backend="cpu",  # fills the buffer with 255
                      **dict(kw, x_scale=torch.tensor(1.0), in_signed=False))
        got = packed_conv3d(layout, wp, ws, out="acc", backend="cpu", **kw)
        assert torch.equal(got, ref)


# ---- the module -----------------------------------------------------------------------------
@pytest.mark.parametrize("strided", [False, True])
def test_module_binary_float_input_and_groups(strided):
    m = PackedConv3d(1, 4, 3, padding=1, w_bits=4, a_bits=None)
    x = (torch.rand(1, 1, 2, 4, 10) < 0.5).float()
    if strided:  # a view the one-pass C++ check reads through .contiguous()
        x = x[..., ::2]
    assert torch.equal(m(x), m(x.bool()))
    for bad in (0.5, 2.0, -1.0, 255.0, 256.0, 1e-45, float("nan"), float("inf")):
        xb = x.clone()
        xb[0, 0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match="qgait::packed_conv3d: .*binary"):
            m(xb)
    assert torch.equal(m(torch.where(x == 0, -0.0, x)), m(x))   # -0.0 is 0


@pytest.mark.skipif(not _ext.has_kernel("_binary_codes", "CPU"), reason="qgait._C not built")
def test_binary_codes_op_matches_python_check():
    """The one-pass C++ codes and count of non-binary values (the stem's check) against the
    torch expression, on values around 0 and 1 and the special floats."""
    vals = torch.tensor([0.0, -0.0, 1.0, 0.5, 2.0, -1.0, 1.0000001, 0.99999994, 1e-45, 255.0,
                         256.0, float("nan"), float("inf"), float("-inf")])
    x = vals[torch.randint(0, len(vals), (3, 1, 5, 7, 9), generator=torch.Generator()
                           .manual_seed(0))]
    codes, bad = torch.ops.qgait._binary_codes(x)
    assert codes.dtype == torch.uint8 and torch.equal(codes, (x == 1).to(torch.uint8))
    assert bad == int(((x != 0) & (x != 1)).sum())
    codes, bad = torch.ops.qgait._binary_codes((x == 1).float())
    assert bad == 0
    with pytest.raises(ValueError, match="qgait::packed_conv3d: .*groups=1"):
        PackedConv3d(4, 4, 3, groups=2)


def _module_ref(m, x):
    """The module's call spelled out through the public function (nothing kept)."""
    return packed_conv3d(
        x, m.w_packed, m.w_scale, w_bits=m.storage_bits, c_in=m.in_channels, x_scale=m.a_scale,
        in_bits=m.a_bits, in_signed=m.a_signed, stride=m.stride, padding=m.padding,
        dilation=m.dilation, bias=m.bias, bn_scale=m.bn_scale, bn_shift=m.bn_shift, act=m.act,
        neg_slope=m.neg_slope, out="quant" if m.out_scale is not None else "float",
        out_scale=m.out_scale, out_bits=m.out_bits, out_signed=m.out_signed, backend="reference")


def test_module_kept_arguments_follow_every_change(monkeypatch):
    """PackedConv3d keeps its checked arguments between calls; every change of what the call
    reads (in-place writes, load_state_dict, replaced buffers, attributes, the backend, x's
    dtype) must reach the next call."""
    g = torch.Generator().manual_seed(0)
    m = PackedConv3d(3, 5, 3, padding=1, w_bits=8, a_bits=8, a_signed=True)
    with torch.no_grad():
        m.w_packed.copy_(pack_weight(torch.randint(-128, 128, (5, 3, 3, 3, 3), generator=g), 8))
        m.w_scale.copy_(torch.rand(5, generator=g) * 0.01 + 1e-3)
        m.a_scale.fill_(0.05)
    x = torch.randn(1, 3, 2, 5, 4, generator=g)

    def check():
        assert torch.equal(m(x), _module_ref(m, x))
    check()
    with torch.no_grad():
        m.w_scale.mul_(2.0)                      # in place: the version moves
    check()
    with torch.no_grad():
        m.w_scale[1] = -1.0                      # ... so the values are checked again
    with pytest.raises(ValueError, match="w_scale must be finite and > 0"):
        m(x)
    with torch.no_grad():
        m.w_scale[1] = 0.004
    check()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["a_scale"] = torch.tensor(0.07)
    m.load_state_dict(sd)
    check()
    m.bias = torch.full((5,), 0.25)              # a replaced buffer
    check()
    m.act, m.neg_slope = "leaky_relu", 0.2
    check()
    m.set_output_quant(torch.tensor(0.1), 8, True)
    y = m(x)
    assert y.dtype == torch.int8 and torch.equal(y, _module_ref(m, x))
    m.set_output_quant(None)
    check()
    xi = torch.randint(-128, 128, x.shape, generator=g, dtype=torch.int8)
    assert torch.equal(m(xi), _module_ref(m, xi))   # another dtype
    m.backend = "cuda"                           # x is on the CPU: refused
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        m(x)
    m.backend = None
    monkeypatch.setenv("QGAIT_BACKEND", "nonesuch")
    with pytest.raises(ValueError, match="unknown backend 'nonesuch'"):
        m(x)
    monkeypatch.delenv("QGAIT_BACKEND")
    check()
    with pytest.raises(ValueError, match="x has 4 input channels"):
        m(torch.zeros(1, 4, 2, 5, 4))
    # a module that has run still pickles and copies (the kept arguments are not state)
    m2 = pickle.loads(pickle.dumps(m))
    assert "_prepared" in m.__dict__ and "_prepared" not in m2.__dict__
    assert torch.equal(m2(x), m(x)) and torch.equal(copy.deepcopy(m)(x), m(x))
    with torch.inference_mode():                 # inference tensors: nothing is kept
        mi = PackedConv3d(3, 5, 3, padding=1, w_bits=8, a_bits=8, a_signed=True)
        mi.load_state_dict(m.state_dict())
        mi.act, mi.neg_slope = m.act, m.neg_slope
        assert torch.equal(mi(x), m(x))
        mi.w_scale.mul_(2.0)
        assert torch.equal(mi(x), _module_ref(mi, x))


# ---- bad input ------------------------------------------------------------------------------
def _bad_calls():
    x, wp, ws, kw = make_case(CASES[0], 8, "float_signed")
    _, wp4, _, _ = make_case(CASES[0], 4, "float_signed")
    kw4 = dict(kw, w_bits=4)
    return {
        "bits_mismatch": lambda: packed_conv3d(x, wp4, ws, **kw),
        "bits_mismatch4": lambda: packed_conv3d(x, wp, ws, **kw4),
        "packed_shape": lambda: packed_conv3d(x, wp[..., :2], ws, **kw),
        "scale_zero": lambda: packed_conv3d(x, wp, ws * 0, **kw),
        "scale_nan": lambda: packed_conv3d(x, wp, ws, **dict(kw, x_scale=torch.tensor(float("nan")))),
        "x_dtype": lambda: packed_conv3d(x.double(), wp, ws, **kw),
        "channels": lambda: packed_conv3d(x[:, :2], wp, ws, **kw),
        "too_small": lambda: packed_conv3d(x[..., :1, :1, :1], wp, ws, **dict(kw, padding=0)),
        "quant_no_scale": lambda: packed_conv3d(x, wp, ws, out="quant", **kw),
        "act": lambda: packed_conv3d(x, wp, ws, act="gelu", **kw),
    }


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_input_names_op(name, backend, monkeypatch):
    monkeypatch.setenv("QGAIT_BACKEND", backend)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="qgait::packed_conv3d"):
        _bad_calls()[name]()


def test_cpu_op_checks_directly():
    """The C++ op validates on its own (callers that bypass the Python checks)."""
    x, wp, ws, kw = make_case(CASES[0], 8, "float_signed")
    op = torch.ops.qgait.packed_conv3d
    good = [x, torch.tensor(0.1), -128, 127, wp, ws, 8, 3, [1] * 3, [1] * 3, [1] * 3, None, None,
            None, 0, 0.0, 0, None, 0, 0]
    assert op(*good).shape == (1, 5, 3, 5, 6)
    for i, v, msg in [(4, wp.view(torch.uint8), "dtype"), (5, -ws, "finite and > 0"),
                      (0, x[:, :2], "input channels"), (6, 4, "w_bits=4"), (14, 7, "act"),
                      (0, x.double(), "x must be float32")]:
        bad = list(good)
        bad[i] = v
        with pytest.raises(RuntimeError, match=f"qgait::packed_conv3d: .*{msg}"):
            op(*bad)


def test_opcheck():
    x, wp, ws, kw = make_case(CASES[0], 4, "float_signed")
    args = (x, torch.tensor(0.1), -128, 127, wp, ws, 4, 3, [1] * 3, [1] * 3, [1] * 3,
            torch.randn(5), None, None, 1, 0.0, 1, torch.tensor(0.2), 0, 255)
    torch.library.opcheck(torch.ops.qgait.packed_conv3d.default, args)


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] != "cpu"])
@pytest.mark.parametrize("out", ["float", "quant"])
def test_gpu_backends_epilogue_exact(backend, out):
    """Fused epilogue (bias, folded BN, LeakyReLU; fp32 or requantized) bit for bit."""
    dev = device_of(backend)
    case = TINY[0]
    x, wp, ws, kw = make_case(case, 4, "float_unsigned")
    args = dict(act="leaky_relu", neg_slope=0.1, out=out, out_scale=torch.tensor(0.07),
                **_epilogue_args(case[2]), **kw)
    ref = packed_conv3d(x, wp, ws, backend="reference", **args)
    on = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    got = packed_conv3d(x.to(dev), wp.to(dev), ws.to(dev), backend=backend, **on)
    assert got.dtype == ref.dtype and torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_scale_checked_once_per_version_and_again_after_a_write(backend, monkeypatch):
    # the value check is skipped for a scale tensor already found valid, unless it was written
    monkeypatch.setenv("QGAIT_BACKEND", backend)
    x, wp, ws, kw = make_case(CASES[0], 8, "float_signed")
    ws = ws.clone()
    ref = packed_conv3d(x, wp, ws, **kw)
    assert torch.equal(packed_conv3d(x, wp, ws, **kw), ref)
    ws[0] = float("nan")                 # in place: a new version, checked again
    with pytest.raises(ValueError, match="w_scale must be finite and > 0"):
        packed_conv3d(x, wp, ws, **kw)
    ws[0] = 1.0
    packed_conv3d(x, wp, ws, **kw)
    with torch.no_grad():
        ws.copy_(-ws)
    with pytest.raises(ValueError, match="w_scale must be finite and > 0"):
        packed_conv3d(x, wp, ws, **kw)
    with torch.inference_mode():         # inference tensors have no version: always checked
        bad = -ws.abs()
        with pytest.raises(ValueError, match="w_scale must be finite and > 0"):
            packed_conv3d(x, wp, bad, **kw)


@pytest.mark.parametrize("value,want", [("avx2", "avx2"), ("scalar", "scalar"),
                                        ("avx-2", None), ("AVX2", None)])
def test_cpu_isa_env_names_and_a_typo(value, want):
    """QGAIT_CPU_ISA caps the level in a fresh process; a value that is not a level is ignored
    with one warning naming the variable and the levels (the import still works)."""
    import subprocess
    import sys

    if not _ext.HAS_C:
        pytest.skip("qgait._C not built")
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import torch, qgait; print('ISA', torch.ops.qgait._cpu_isa())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "QGAIT_CPU_ISA": value})
    assert p.returncode == 0, p.stderr[-2000:]
    isa = p.stdout.split("ISA ", 1)[1].strip()
    detected = torch.ops.qgait._cpu_features().split()[0].split("=")[1]
    if want == "avx2" and detected == "scalar":
        want = "scalar"  # a cap never raises the level
    if want is None:
        assert f"QGAIT_CPU_ISA={value!r} is not one of amx, avx512, avx2_vnni, avx2, scalar" \
            in p.stderr, p.stderr[-2000:]
        assert isa == detected
    else:
        assert "QGAIT_CPU_ISA" not in p.stderr and isa == want

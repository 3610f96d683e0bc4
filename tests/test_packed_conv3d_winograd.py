"""packed_conv3d's Winograd F(2x2, 3x3) path (csrc/cpu/packed_conv3d.cpp): layers of kT x 3 x 3
taps, stride 1 and padding 1 in H / W, with codes of range <= 63 and weights of magnitude <= 14
run as 16 GEMMs over 2 x 2 output tiles. It is exact, so every case is compared bit for bit
with the reference, with the path the op reports (`_packed_conv3d_cpu_path`) checked, so a
change that silently sends these layers back to the direct path fails here too. By default the
op takes the path only for layers wide enough to gain from it (see
test_winograd_by_default_only_where_it_measured_faster); QGAIT_WINOGRAD=1, set for every test
here unless it says otherwise, takes it wherever it is exact, so the edge shapes below run on
it."""
import pytest
import torch

from qgait.ops import packed_conv3d
from qgait.quant import pack_weight

from conftest import _isa_ok

# (N, C_in, C_out, (T, H, W), (kT, 3, 3), temporal stride, temporal padding, temporal dilation)
SHAPES = [
    (1, 16, 32, (5, 8, 6), 3, 1, 1, 1),      # GaitLite3D's 3x3x3 layers, small
    (2, 5, 17, (3, 7, 5), 1, 1, 0, 1),       # odd H and W, C_in not a multiple of 4, C_out tail
    (1, 3, 70, (6, 9, 13), 3, 2, 1, 1),      # temporal stride, C_out over one 64-channel group
    (1, 8, 16, (7, 3, 3), 3, 1, 2, 2),       # temporal dilation
    (1, 2, 3, (1, 1, 1), 1, 1, 0, 1),        # a single pixel: one tile, mostly padding
    (1, 40, 20, (2, 5, 2), 2, 1, 0, 1),      # even kT, W = 2
    (1, 12, 9, (2, 2, 37), 1, 1, 0, 1),      # a wide row: 19 tiles
    (1, 64, 128, (2, 4, 4), 3, 1, 1, 1),     # long reduction (48 steps of 4 channels)
]
# input kinds on grids whose codes span at most 63
INPUTS = ["int8_4bit", "float_4bit_signed", "uint8_4bit", "bool", "float_6bit_signed"]


@pytest.fixture(autouse=True)
def winograd_wherever_exact(monkeypatch):
    monkeypatch.setenv("QGAIT_WINOGRAD", "1")


def _ids(shapes):
    return [f"n{s[0]}c{s[1]}o{s[2]}t{s[3][0]}h{s[3][1]}w{s[3][2]}k{s[4]}s{s[5]}p{s[6]}d{s[7]}"
            for s in shapes]


def _case(shape, kind, w_bits=4, wv=None, seed=0):
    n, ci, co, (t, h, w), kt, st, pt, dt = shape
    g = torch.Generator().manual_seed(seed)
    if wv is None:
        lo, hi = (-8, 7) if w_bits == 4 else (-14, 14)
        w_int = torch.randint(lo, hi + 1, (co, ci, kt, 3, 3), generator=g)
    else:
        w_int = torch.full((co, ci, kt, 3, 3), wv)
    kw = dict(w_bits=w_bits, c_in=ci, stride=(st, 1, 1), padding=(pt, 1, 1),
              dilation=(dt, 1, 1), x_scale=torch.tensor(0.25))
    size = (n, ci, t, h, w)
    if kind == "int8_4bit":
        x = torch.randint(-8, 8, size, generator=g).to(torch.int8)
        kw.update(in_bits=4, in_signed=True)
    elif kind == "uint8_4bit":
        x = torch.randint(0, 16, size, generator=g).to(torch.uint8)
        kw.update(in_bits=4, in_signed=False)
    elif kind == "bool":
        x = torch.rand(size, generator=g) < 0.5
        kw.pop("x_scale")
    elif kind == "float_4bit_signed":
        x = torch.randn(size, generator=g) * 2
        kw.update(in_bits=4, in_signed=True)
    else:  # float_6bit_signed: codes 0..63, the widest range the transform takes
        x = torch.randn(size, generator=g) * 8
        kw.update(in_bits=6, in_signed=True)
    w_scale = torch.rand(co, generator=g) * 0.02 + 1e-3
    return x, pack_weight(w_int, w_bits), w_scale, kw, w_int


# F(2, 3)'s weight transform, doubled to integers (G' = 2 G)
G2 = torch.tensor([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]])


def transformed_weight_range(w_int):
    """Range of U = G' g G'^T over every 3 x 3 slice g of the weights [C_out, C_in, kT, 3, 3]
    (the op's int8 operand; 0 is always inside, as in the op)."""
    u = torch.einsum("ih,jw,...hw->...ij", G2, G2, w_int.long())
    return min(0, int(u.min())), max(0, int(u.max()))


def code_range(x, kw):
    """The range of the call's integers (0 always inside): the op measures it, for a float
    input on the codes of its extremes."""
    if x.dtype == torch.bool:
        return 1
    if x.dtype == torch.float32:
        bits, signed = kw.get("in_bits", 8), kw.get("in_signed", False)
        qn, qp = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        x = torch.clamp(torch.round(x / kw["x_scale"]), qn, qp)
    return max(0, int(x.max())) - min(0, int(x.min()))


def _expect_winograd(cpu_isa, x, kw, w_int) -> bool:
    """Whether this CPU level takes the Winograd path: codes of range <= 63 and weights of
    magnitude <= 14 always; not on the scalar path; on the AVX2 class without AVX-VNNI only
    where a pair of vpmaddubsw products (transformed codes <= 4 a times transformed weights)
    cannot saturate int16 (with AVX-VNNI its GEMMs run on vpdpbusd ymm)."""
    feats = torch.ops.qgait._cpu_features()
    a = code_range(x, kw)
    if cpu_isa == "scalar" or a > 63 or w_int.abs().max() > 14:
        return False
    if cpu_isa in ("avx512", "amx") and "vnni=1" in feats:
        return True
    if cpu_isa == "avx2_vnni":  # VEX vpdpbusd: int32 sums, no int16 bound
        return True
    ulo, uhi = transformed_weight_range(w_int)
    return 8 * a * uhi <= 32767 and 8 * a * -ulo <= 32768


def _run(x, wp, ws, kw, **extra):
    got = packed_conv3d(x, wp, ws, backend="cpu", **kw, **extra)
    path = torch.ops.qgait._packed_conv3d_cpu_path()
    ref = packed_conv3d(x, wp, ws, backend="reference", **kw, **extra)
    return got, ref, path


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_winograd_acc_exact(cpu_isa, shape, kind):
    x, wp, ws, kw, w_int = _case(shape, kind)
    got, ref, path = _run(x, wp, ws, kw, out="acc")
    assert torch.equal(got, ref)
    assert path.endswith("-winograd") == _expect_winograd(cpu_isa, x, kw, w_int), path


@pytest.mark.parametrize("out", ["float", "quant"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=_ids(SHAPES[:4]))
def test_winograd_epilogues_exact(cpu_isa, shape, out):
    """Bias, folded BatchNorm, LeakyReLU and requantization to 4-bit codes, as in the packed
    GaitLite3D; channels-last input, as a chained layer passes it."""
    x, wp, ws, kw, w_int = _case(shape, "int8_4bit", seed=1)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    co = ws.numel()
    g = torch.Generator().manual_seed(2)
    extra = dict(bias=torch.randn(co, generator=g), bn_scale=torch.rand(co, generator=g) + 0.5,
                 bn_shift=torch.randn(co, generator=g), act="leaky_relu", out=out)
    if out == "quant":
        extra.update(out_scale=torch.tensor(0.7), out_bits=4, out_signed=True)
    got, ref, path = _run(x, wp, ws, kw, **extra)
    assert torch.equal(got, ref)
    assert path.endswith("-winograd") == _expect_winograd(cpu_isa, x, kw, w_int), path


# Weights at each extreme against codes at their maximum: the transformed weights reach
# +-9 |w| (72 for -8), the transformed codes 4 x 15 = 60 (4-bit) or 4 x 63 = 252 (6-bit), so
# an offset, a sign or an int16 chunk one step too long for them shows.
@pytest.mark.parametrize("wv,w_bits", [(-8, 4), (7, 4), (-14, 8), (14, 8)])
@pytest.mark.parametrize("kind", ["uint8_4bit", "float_4bit_signed", "float_6bit_signed"])
def test_winograd_range_extremes_exact(cpu_isa, wv, w_bits, kind):
    shape = (1, 36, 17, (3, 6, 7), 3, 1, 1, 1)
    x, wp, ws, kw, w_int = _case(shape, kind, w_bits=w_bits, wv=wv)
    top = {"uint8_4bit": 15, "float_4bit_signed": 7 * 0.25, "float_6bit_signed": 31 * 0.25}[kind]
    bottom = {"uint8_4bit": 0, "float_4bit_signed": -8 * 0.25,
              "float_6bit_signed": -32 * 0.25}[kind]
    x = torch.full_like(x, top)
    x[..., 1::3] = bottom  # every code at one end or the other of the grid
    for out in ("acc", "float"):
        got, ref, path = _run(x, wp, ws, kw, out=out)
        assert torch.equal(got, ref), (wv, kind, out, path)
    # 8-bit weights of magnitude 14: transformed up to 126, still int8
    assert path.endswith("-winograd") == _expect_winograd(cpu_isa, x, kw, w_int), path


@pytest.mark.parametrize("what", ["codes past 63", "weights past 14", "stride 2", "padding 0",
                                  "kernel 5x5", "one input channel", "turned off"])
def test_direct_path_where_winograd_does_not_apply(cpu_isa, what, monkeypatch):
    """Outside its conditions the op keeps the direct path, and stays exact."""
    shape = (1, 6, 10, (3, 6, 7), 3, 1, 1, 1)
    x, wp, ws, kw, w_int = _case(shape, "int8_4bit")
    if what == "codes past 63":
        x = torch.randint(0, 65, x.shape, generator=torch.Generator().manual_seed(4)
                          ).to(torch.uint8)
        x[0, 0, 0, 0, 0] = 64
        kw.update(in_bits=8, in_signed=False)
    elif what == "weights past 14":
        w_int = torch.randint(-14, 15, (10, 6, 3, 3, 3))
        w_int[0, 0, 0, 0, 0] = -15
        wp = pack_weight(w_int, 8)
        kw["w_bits"] = 8
        assert not _expect_winograd("avx512", x, kw, w_int)
    elif what == "stride 2":
        kw["stride"] = (1, 2, 1)
    elif what == "padding 0":
        kw["padding"] = (1, 0, 1)
    elif what == "kernel 5x5":
        wp = pack_weight(torch.randint(-8, 8, (10, 6, 3, 5, 5)), 4)
        kw["padding"] = (1, 2, 2)
    elif what == "one input channel":
        x = x[:, :1].contiguous()
        wp = pack_weight(torch.randint(-8, 8, (10, 1, 3, 3, 3)), 4)
        kw["c_in"] = 1
    else:
        monkeypatch.setenv("QGAIT_WINOGRAD", "0")
    got, ref, path = _run(x, wp, ws, kw, out="acc")
    assert torch.equal(got, ref)
    assert "winograd" not in path, path


# (C_in, C_out, kT, taken with vpdpbusd, taken on the AVX2 class)
DEFAULT_CHOICE = [(16, 32, 3, True, True), (64, 128, 1, True, True), (8, 16, 3, False, False),
                  (16, 16, 1, False, False), (12, 64, 3, False, False), (32, 24, 3, False, False),
                  (32, 32, 1, True, False), (16, 48, 2, True, False)]


@pytest.mark.parametrize("ci,co,kt,vnni_taken,avx2_taken", DEFAULT_CHOICE)
def test_winograd_by_default_only_where_it_measured_faster(cpu_isa, ci, co, kt, vnni_taken,
                                                           avx2_taken, monkeypatch):
    """Unset, QGAIT_WINOGRAD leaves narrow layers on the direct path, where they measured
    faster: fewer than 32 output channels, or (vpdpbusd) fewer than 16 input channels, or
    (AVX2 class) kT x C_in < 48. Both paths stay exact."""
    monkeypatch.delenv("QGAIT_WINOGRAD")
    x, wp, ws, kw, w_int = _case((1, ci, co, (3, 6, 5), kt, 1, kt // 2, 1), "int8_4bit", seed=9)
    got, ref, path = _run(x, wp, ws, kw, out="acc")
    assert torch.equal(got, ref)
    feats = torch.ops.qgait._cpu_features()
    vnni = cpu_isa in ("avx512", "amx") and "vnni=1" in feats
    taken = vnni_taken if vnni else avx2_taken
    # on the AMX level the AMX tiles take the layers they are wanted for (segments of kW x C_in
    # bytes >= 32, >= 16 output channels), Winograd only the others
    amx = cpu_isa == "amx" and "amx_int8=1" in feats and 3 * ((ci + 3) // 4 * 4) >= 32 and co >= 16
    assert (path == "amx") == amx, path
    taken = taken and not amx
    assert path.endswith("-winograd") == (taken and _expect_winograd(cpu_isa, x, kw, w_int)), path


@pytest.mark.parametrize("name", ["casiab-lite3d-w4a4-packed", "casiab-lite3d-w8a8-packed"])
def test_shipped_packed_models_same_with_winograd_on_and_off(name, monkeypatch):
    """The shipped packed models give the same embeddings with the path on and off: W4A4's
    3 x 3 trunk layers take it (where the CPU has it), W8A8's (8-bit codes) never do."""
    if not _isa_ok("avx2"):
        pytest.skip("the Winograd path needs an AVX2-class CPU (and qgait._C)")
    from qgait.zoo import load

    model, _ = load(name)
    x = (torch.rand(1, 1, 8, 64, 44, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    paths = []
    hook = model.stage2[0][0].register_forward_hook(
        lambda *_: paths.append(torch.ops.qgait._packed_conv3d_cpu_path()))
    outs = {}
    for flag in ("auto", "1", "0"):
        if flag == "auto":
            monkeypatch.delenv("QGAIT_WINOGRAD")
        else:
            monkeypatch.setenv("QGAIT_WINOGRAD", flag)
        with torch.no_grad():
            outs[flag] = model(x)["embeddings"]
    hook.remove()
    assert torch.equal(outs["auto"], outs["0"]) and torch.equal(outs["1"], outs["0"])
    on = "w4a4" in name  # stage2's 32 -> 64 3x3x3: wide enough
    # (where the CPU has AMX, the layer takes the AMX tiles unless Winograd is forced)
    amx = "amx_int8=1" in torch.ops.qgait._cpu_features()
    assert [p.endswith("-winograd") for p in paths] == [on and not amx, on, False], paths
    assert (paths[0] == "amx") == amx, paths


@pytest.mark.parametrize("threads", [1, 2])
def test_winograd_rows_reused_across_frames_exact(cpu_isa, threads):
    """Each thread keeps the transformed input rows of the last frames and reuses them for the
    next output frame of the same tile row: sequences in a batch, temporal stride and
    dilation, and work chunks that start mid-sequence (2 threads) must never pick up a row of
    another frame, sequence or tile row."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(3, 8, 16, (9, 6, 5), 3, 1, 1, 1), (2, 4, 8, (11, 4, 4), 3, 2, 2, 2),
                      (2, 16, 24, (7, 10, 3), 2, 1, 0, 3)]:
            x, wp, ws, kw, w_int = _case(shape, "int8_4bit", seed=7)
            got, ref, path = _run(x, wp, ws, kw, out="acc")
            assert torch.equal(got, ref), shape
            assert path.endswith("-winograd") == _expect_winograd(cpu_isa, x, kw, w_int), path
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("where", ["nowhere", "first frame", "last frame"])
def test_winograd_code_range_past_the_first_codes(cpu_isa, dtype, where):
    """Before measuring an integer input's range the op looks at its first 8 KiB (wide there:
    no Winograd, no full pass). Codes spanning more than 63 only past them (the last frame of a
    channels-last [1, 16, 4, 16, 12] map: elements 9216 on) must still keep the layer off the
    Winograd path, whose transformed codes would wrap; only in the first frame, too."""
    g = torch.Generator().manual_seed(3)
    lo, hi = (-8, 8) if dtype == torch.int8 else (0, 16)
    x = torch.randint(lo, hi, (1, 16, 4, 16, 12), generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    if where != "nowhere":
        x[:, :, 0 if where == "first frame" else -1, 3:9] = 100
    w_int = torch.randint(-8, 8, (32, 16, 1, 3, 3), generator=g)
    kw = dict(w_bits=4, c_in=16, padding=(0, 1, 1), x_scale=torch.tensor(0.25),
              in_signed=dtype == torch.int8)
    got, ref, path = _run(x, pack_weight(w_int, 4), torch.rand(32, generator=g) * 0.02 + 1e-3,
                          kw, out="acc")
    assert torch.equal(got, ref)
    assert path.endswith("-winograd") == _expect_winograd(cpu_isa, x, kw, w_int), path
    assert path.endswith("-winograd") == (where == "nowhere" and cpu_isa != "scalar"), path

"""packed_conv3d's AMX-INT8 path (csrc/cpu/packed_conv3d_amx.cpp) against the exact reference.

The other CPU tests run at the "amx" ISA level too (conftest.ISA_LEVELS), where layers take the
AMX tiles only where they measured faster (QGAIT_AMX unset); here QGAIT_AMX=1 forces them onto
every layer they can run (all but a folded 1-channel stem), over shapes aimed at what the
tiles do differently: reduction segments that are not a multiple of 64 bytes (the chunk tail
meets zero weights), the virtual pixel grid (stride 1: a frame as one run over the padded
width; otherwise 16-pixel tiles per output row), odd tile counts (a pair with one tile),
output channels that leave a block or a pair of blocks partly empty, dilated W (one segment
per tap), and every epilogue. Skipped where the CPU (or Linux) gives no AMX."""
import pytest
import torch

import qgait
from qgait import _ext
from qgait.ops import packed_conv3d
from qgait.quant import pack_weight

from test_packed_conv3d import CASES, INPUTS, RANGE_SHAPES, _epilogue_args, _ids, make_case


def _has_amx() -> bool:
    return _ext.HAS_C and "amx_int8=1" in torch.ops.qgait._cpu_features()


pytestmark = pytest.mark.skipif(
    not _has_amx(),
    reason="no AMX-INT8 here (CPU flag amx_int8 and Linux's permission for the tile state); "
           "its kernel is compiled but cannot run")

# (N, C_in, C_out, (T, H, W), kernel, stride, padding, dilation)
AMX_CASES = [
    (1, 16, 32, (3, 8, 9), (3, 3, 3), 1, 1, 1),          # 48-byte segments, flat grid
    (2, 32, 64, (2, 5, 7), (1, 3, 3), 1, (0, 1, 1), 1),  # 96-byte segments: two chunks
    (1, 64, 128, (2, 4, 11), (1, 3, 3), 1, (0, 1, 1), 1),  # 192 bytes: three whole chunks
    (1, 24, 17, (2, 6, 5), (3, 3, 3), 1, 1, 1),          # 17 channels: a second, 1-wide block
    (1, 40, 48, (3, 7, 19), (3, 3, 3), 1, 1, 1),         # three blocks: a pair and a single
    (1, 20, 33, (2, 9, 40), (1, 3, 3), (1, 1, 2), (0, 1, 1), 1),  # W stride 2: tiles per row
    (1, 12, 16, (4, 6, 6), (3, 3, 3), (2, 2, 1), 1, 1),  # H stride 2: tiles per row
    (1, 16, 32, (2, 6, 12), (1, 3, 3), 1, 2, (1, 2, 3)),  # dilated W: one segment per tap
    (3, 8, 20, (1, 1, 1), (1, 1, 1), 1, 0, 1),           # one pixel per frame, batch 3
    (1, 64, 16, (1, 17, 3), (1, 3, 1), 1, (0, 1, 0), 1),  # tall and narrow, W unpadded
]


@pytest.fixture
def amx(monkeypatch):
    monkeypatch.setenv("QGAIT_AMX", "1")
    qgait.set_cpu_isa("amx")
    yield
    qgait.set_cpu_isa("amx")


def _expect_path(case) -> str:
    folded = case[1] == 1 and case[4][2] <= 4 and (case[7] if isinstance(case[7], int)
                                                    else case[7][2]) == 1
    return "vnni" if folded else "amx"


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", AMX_CASES + CASES + RANGE_SHAPES,
                         ids=_ids(AMX_CASES + CASES + RANGE_SHAPES))
def test_amx_acc_exact(amx, case, w_bits, kind):
    x, wp, ws, kw = make_case(case, w_bits, kind)
    y = packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw)
    path = torch.ops.qgait._packed_conv3d_cpu_path()
    assert path.startswith(_expect_path(case)), path
    assert torch.equal(y, packed_conv3d(x, wp, ws, out="acc", backend="reference", **kw))


@pytest.mark.parametrize("case", AMX_CASES[:6], ids=_ids(AMX_CASES[:6]))
def test_amx_epilogues_exact(amx, case):
    """Float output with bias, folded BatchNorm and each activation; requantized int8 / uint8
    output: the AVX-512 epilogue finishing the tiles' sums, bit for bit with the reference."""
    x, wp, ws, kw = make_case(case, 4, "float_signed")
    ep = _epilogue_args(case[2])
    for act in ("none", "relu", "leaky_relu"):
        a = dict(act=act, neg_slope=0.1, **ep, **kw)
        y = packed_conv3d(x, wp, ws, backend="cpu", **a)
        assert torch.ops.qgait._packed_conv3d_cpu_path() == "amx"
        assert torch.equal(y, packed_conv3d(x, wp, ws, backend="reference", **a))
    for signed in (False, True):
        a = dict(act="leaky_relu", out="quant", out_scale=torch.tensor(0.07), out_bits=8,
                 out_signed=signed, **ep, **kw)
        assert torch.equal(packed_conv3d(x, wp, ws, backend="cpu", **a),
                           packed_conv3d(x, wp, ws, backend="reference", **a))


@pytest.mark.parametrize("threads", [1, 2])
def test_amx_threads_and_extremes(amx, threads):
    """Work split over threads (each loads its own tile configuration), and sums at their
    extremes: every code at 255 against weights all -128 or all 127 over a long reduction."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = (2, 72, 40, (5, 6, 13), (3, 3, 3), 1, 1, 1)
        x, wp, ws, kw = make_case(case, 8, "uint8", seed=4)
        assert torch.equal(packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw),
                           packed_conv3d(x, wp, ws, out="acc", backend="reference", **kw))
        xu = torch.full_like(x, 255)
        for v in (-128, 127):
            wpv = pack_weight(torch.full((40, 72, 3, 3, 3), v), 8)
            y = packed_conv3d(xu, wpv, ws, out="acc", backend="cpu", **kw)
            assert torch.equal(y, packed_conv3d(xu, wpv, ws, out="acc", backend="reference",
                                                **kw))
            assert int(y.abs().max()) == 255 * abs(v) * 72 * 27
    finally:
        torch.set_num_threads(prev)


def test_amx_only_where_wanted(monkeypatch):
    """Unset, QGAIT_AMX sends a layer to the tiles when its segments hold at least 32 bytes
    and it has at least 16 output channels (below that the VNNI tiles measured faster, see
    amx_wanted); 0 keeps every layer on the AVX-512 VNNI path; capping the ISA to avx512 too."""
    monkeypatch.delenv("QGAIT_AMX", raising=False)
    qgait.set_cpu_isa("amx")

    def path(case):
        x, wp, ws, kw = make_case(case, 8, "uint8")
        packed_conv3d(x, wp, ws, out="acc", backend="cpu", **kw)
        return torch.ops.qgait._packed_conv3d_cpu_path()

    wide = (1, 16, 32, (2, 5, 7), (3, 3, 3), 1, 1, 1)       # 48-byte segments
    narrow = (1, 8, 32, (2, 5, 7), (3, 3, 3), 1, 1, 1)      # 24-byte segments
    few = (1, 32, 8, (2, 5, 7), (1, 3, 3), 1, (0, 1, 1), 1)  # 8 output channels
    assert path(wide) == "amx"
    assert not path(narrow).startswith("amx") and not path(few).startswith("amx")
    monkeypatch.setenv("QGAIT_AMX", "0")
    assert not path(wide).startswith("amx")
    monkeypatch.delenv("QGAIT_AMX")
    try:
        qgait.set_cpu_isa("avx512")
        assert not path(wide).startswith("amx")
    finally:
        qgait.set_cpu_isa("amx")

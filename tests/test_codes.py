"""qgait.ops.codes: max pooling of codes and the integer part FCs, each C++ kernel against its
pure-PyTorch reference (bit for bit) at every CPU SIMD level, over odd and edge shapes."""
import pytest
import torch

from qgait.ops import codes

needs_pool = pytest.mark.skipif(not codes._HAS_POOL, reason="qgait._C not built")
needs_fc = pytest.mark.skipif(not codes._HAS_FC, reason="qgait._C not built")


def _codes(shape, dtype, g):
    lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127)
    return torch.randint(lo, hi + 1, shape, dtype=dtype, generator=g)


# ---- max pooling -----------------------------------------------------------------------------
POOL_CASES = [
    ((1, 32, 30, 32, 22), (1, 2, 2), (1, 2, 2)),     # GaitLite3D's pool1, width 1.0
    ((2, 5, 7, 9, 11), (2, 3, 2), (1, 2, 3)),        # overlapping, odd sizes, floored tails
    ((1, 17, 3, 5, 5), (3, 3, 3), (2, 2, 2)),
    ((1, 3, 1, 1, 1), (1, 1, 1), (1, 1, 1)),         # one pixel
    ((3, 1, 4, 7, 3), (1, 3, 3), (1, 1, 1)),         # one channel
    ((1, 65, 2, 4, 6), (2, 2, 2), (2, 2, 2)),        # channels past a vector
    ((1, 8, 2, 3, 3), (1, 3, 3), (5, 5, 5)),         # stride beyond the input: one output
]


@needs_pool
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("shape,k,s", POOL_CASES)
def test_max_pool_codes_matches_reference(cpu_isa, dtype, shape, k, s):
    g = torch.Generator().manual_seed(hash((shape, k, s)) % 2**31)
    x = _codes(shape, dtype, g)
    ref = codes.max_pool_codes_ref(x, k, s)
    for inp in (x, x.contiguous(memory_format=torch.channels_last_3d)):
        got = torch.ops.qgait._max_pool_codes(inp, list(k), list(s))
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last_3d)
        assert torch.equal(got, ref)


@needs_pool
def test_max_pool_codes_extremes_and_views(cpu_isa):
    # the grid's ends (signed: -128 must not win over -1; unsigned: 255 over 0), a strided view
    x = torch.full((1, 16, 2, 4, 4), -128, dtype=torch.int8)
    x[..., 1::2, 1::2] = -1
    assert torch.equal(codes.max_pool_codes(x, (1, 2, 2)), torch.full((1, 16, 2, 2, 2), -1,
                                                                        dtype=torch.int8))
    u = torch.zeros(1, 16, 2, 4, 4, dtype=torch.uint8)
    u[..., 0, 0] = 255
    assert codes.max_pool_codes(u, (1, 2, 2))[..., 0, 0].eq(255).all()
    g = torch.Generator().manual_seed(1)
    big = _codes((2, 12, 6, 10, 9), torch.uint8, g)
    view = big[1:, ::2, 1:, ::3, 1:]
    assert torch.equal(codes.max_pool_codes(view, (2, 2, 2), (1, 1, 2)),
                       codes.max_pool_codes_ref(view, (2, 2, 2), (1, 1, 2)))
    empty = torch.zeros(0, 4, 2, 2, 2, dtype=torch.uint8)
    assert codes.max_pool_codes(empty, (1, 2, 2)).shape == (0, 4, 2, 1, 1)


@needs_pool
def test_max_pool_codes_errors_name_the_op():
    x = torch.zeros(1, 2, 1, 3, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="_max_pool_codes: x must be int8 or uint8"):
        torch.ops.qgait._max_pool_codes(x.float(), [1, 2, 2], [1, 2, 2])
    with pytest.raises(RuntimeError, match="smaller than kernel"):
        torch.ops.qgait._max_pool_codes(x, [2, 2, 2], [1, 1, 1])
    with pytest.raises(RuntimeError, match="must be >= 1"):
        torch.ops.qgait._max_pool_codes(x, [1, 0, 2], [1, 1, 1])
    with pytest.raises(RuntimeError, match=r"\[N, C, T, H, W\]"):
        torch.ops.qgait._max_pool_codes(x[0], [1, 1, 1], [1, 1, 1])


# ---- integer part FCs ------------------------------------------------------------------------
FC_CASES = [  # N, C_in, P, C_out, (qn, qp)
    (1, 128, 31, 128, (-8, 7)),      # GaitLite3D width 1.0, W4A4 (signed input)
    (3, 64, 31, 64, (0, 255)),
    (2, 130, 3, 9, (-128, 127)),     # odd channel counts, the full signed grid
    (1, 1, 1, 1, (0, 1)),
    (4, 33, 5, 17, (-4, 3)),
]


def _fc_args(N, cin, P, cout, g, scale=0.37):
    x = torch.randn(N, cin, P, generator=g) * 3
    w = torch.randint(-128, 128, (P, cout, cin), dtype=torch.int8, generator=g)
    ws = torch.rand(P * cout, generator=g) * 0.1 + 1e-3
    return x, torch.tensor(scale), w, ws


@needs_fc
@pytest.mark.parametrize("N,cin,P,cout,grid", FC_CASES)
def test_part_linear_codes_matches_reference(cpu_isa, N, cin, P, cout, grid):
    g = torch.Generator().manual_seed(cin * 1000 + P)
    x, s, w, ws = _fc_args(N, cin, P, cout, g)
    qn, qp = grid
    ref = codes.part_linear_codes_ref(x, s, qn, qp, w, ws)
    for inp in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):   # and a strided x
        assert torch.equal(torch.ops.qgait._part_linear_codes(inp, s, qn, qp, w, ws), ref)


@needs_fc
def test_part_linear_codes_rounding_nan_inf(cpu_isa):
    # ties round half to even, as soft_fake_quant; NaN poisons its (n, p); +-inf clamp
    s = torch.tensor(0.5)
    x = torch.tensor([[[0.25, 0.75, -0.25, 1.25]]]).reshape(1, 4, 1)   # codes 0, 2, -0, 2
    w = torch.ones(1, 1, 4, dtype=torch.int8)
    ws = torch.ones(1)
    got = codes.part_linear_codes(x, s, -8, 7, w, ws)
    assert got.item() == (0 + 2 + 0 + 2) * 0.5
    x = torch.randn(2, 6, 3)
    x[0, 2, 1] = float("nan")
    x[1, 0, 0], x[1, 1, 2] = float("inf"), float("-inf")
    w = torch.randint(-5, 6, (3, 4, 6), dtype=torch.int8)
    ws = torch.rand(12) + 0.1
    got = codes.part_linear_codes(x, torch.tensor(0.3), -8, 7, w, ws)
    ref = codes.part_linear_codes_ref(x, torch.tensor(0.3), -8, 7, w, ws)
    assert got[0, :, 1].isnan().all() and got.isnan().sum() == 4
    assert torch.equal(got.nan_to_num(), ref.nan_to_num()) and torch.equal(got.isnan(), ref.isnan())


@needs_fc
def test_part_linear_codes_agrees_with_the_fake_quant_product():
    from qgait.ops import soft_fake_quant

    g = torch.Generator().manual_seed(3)
    x, s, w, ws = _fc_args(2, 128, 31, 128, g)
    got = codes.part_linear_codes(x, s, -8, 7, w, ws)
    xq = soft_fake_quant(x, s, bits=4, signed=True)
    wf = (w.float() * ws.reshape(31, 128, 1)).permute(0, 2, 1)
    fq = torch.bmm(xq.permute(2, 0, 1), wf).permute(1, 2, 0)
    torch.testing.assert_close(got, fq, rtol=1e-5, atol=1e-6 * float(fq.abs().max()))


@needs_fc
def test_part_linear_codes_errors_name_the_op():
    g = torch.Generator().manual_seed(0)
    x, s, w, ws = _fc_args(1, 4, 2, 3, g)
    op = torch.ops.qgait._part_linear_codes
    with pytest.raises(RuntimeError, match="_part_linear_codes: x must be float32"):
        op(x.double(), s, 0, 15, w, ws)
    with pytest.raises(RuntimeError, match="does not match x"):
        op(x, s, 0, 15, w[:, :, :3], ws)
    with pytest.raises(RuntimeError, match="w_scale must be float32 with 6 values"):
        op(x, s, 0, 15, w, ws[:5])
    with pytest.raises(RuntimeError, match="a_scale must be finite and > 0"):
        op(x, torch.tensor(0.0), 0, 15, w, ws)
    with pytest.raises(RuntimeError, match=r"code grid \[0, 256\]"):
        op(x, s, 0, 256, w, ws)


def test_paired_codes_ops_bench_runs():
    """bench/paired_codes_ops.py end to end at its smallest settings (times never checked): the
    model with the torch ops it replaced gives the same embeddings up to fp32 rounding."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "paired_codes_ops.py"
    p = subprocess.run([sys.executable, str(script), "--checkpoint", "", "--width", "0.25",
                        "--rounds", "1", "--reps", "1", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for bits in ("W4A4", "W8A8"):
        m = re.search(rf"^{bits}: before \d+\.\d+ ms, after \d+\.\d+ ms .* differ by (\S+) ",
                      p.stdout, re.M)
        assert m and float(m.group(1)) < 1e-5, p.stdout

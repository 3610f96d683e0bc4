"""soft_fake_quant: every backend against the reference, the reference against torch's own
fake-quant ops and against finite differences, and every bad input."""
import math

import pytest
import torch

import qgait
from qgait.ops import soft_fake_quant
from qgait.ops.soft_quant import (default_gamma, quant_grid, soft_fake_quant_backward_ref,
                                  soft_fake_quant_ref)
from conftest import backend_params, device_of

SHAPES = [(1,), (7,), (13, 17), (3, 5, 7, 11), (2, 33, 19), (4, 8, 3, 3, 3)]
TINY = [(1,), (7,), (3, 5, 7), (2, 33, 3)]  # for Triton's interpreter


def _inputs(shape, axis, bits=4, signed=True, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.5).to(dtype)
    if not signed:
        x = x.abs()
    if axis is None:
        s = torch.tensor(0.37)
    else:
        s = torch.rand(shape[axis], generator=g) * 0.5 + 0.05
    return x.to(device), s.to(device)


def _run(backend, x, s, axis, bits, signed, k, mode, gamma=None):
    """y, dx, ds through the public function with autograd."""
    x = x.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    y = soft_fake_quant(x, s, bits=bits, signed=signed, axis=axis, k=k, mode=mode, gamma=gamma,
                        backend=backend)
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).reshape(y.shape).to(y)
    dx, ds = torch.autograd.grad(y, (x, s), gy)
    return y.detach(), dx, ds


def _assert_matches(backend, shape, axis, bits, signed, k, mode, dtype=torch.float32):
    device = device_of(backend)
    x, s = _inputs(shape, axis, bits, signed, dtype=dtype, device=device)
    y, dx, ds = _run(backend, x, s, axis, bits, signed, k, mode)
    yr, dxr, dsr = _run("reference", x, s, axis, bits, signed, k, mode)
    if mode == "hard":
        torch.testing.assert_close(y, yr, rtol=0, atol=0)  # bit-exact
    else:
        # tanh approximations differ by a few ulp: 1e-5 relative, plus an absolute floor of
        # 1e-6 steps for outputs that are ~0.
        torch.testing.assert_close(y.float(), yr.float(), rtol=1e-5, atol=1e-6 * float(s.max()))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(dx.float(), dxr.float(), **tol)
    # step gradients are sums over many elements: relative to the sum of |terms|
    torch.testing.assert_close(ds, dsr, rtol=1e-5, atol=1e-5 * float(dsr.abs().max() + 1))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode,k", [("hard", 0.0), ("hard", 4.0), ("soft", 0.0), ("soft", 2.5)])
@pytest.mark.parametrize("signed", [True, False])
def test_per_tensor_matches_reference(backend, mode, k, signed):
    shapes = TINY if backend == "triton" else SHAPES
    for shape in shapes:
        _assert_matches(backend, shape, None, 4, signed, k, mode)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode,k", [("hard", 0.0), ("hard", 3.0), ("soft", 6.0)])
def test_per_channel_matches_reference_every_axis(backend, mode, k):
    shapes = TINY[2:] if backend == "triton" else SHAPES[2:]
    for shape in shapes:
        for axis in range(len(shape)):
            _assert_matches(backend, shape, axis, 3, True, k, mode)
        _assert_matches(backend, shape, -1, 3, True, k, mode)  # negative axis


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_cpu_every_isa_level(cpu_isa, bits):
    for shape in [(1,), (15,), (17,), (33, 7), (2, 16, 5)]:
        for axis in (None, 0, len(shape) - 1):
            for mode, k in [("hard", 0.0), ("hard", 2.0), ("soft", 2.0)]:
                _assert_matches("cpu", shape, axis, bits, True, k, mode)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    for mode, k in [("hard", 0.0), ("soft", 3.0)]:
        _assert_matches(backend, (3, 37), None, 8, True, k, mode, dtype=dtype)
        _assert_matches(backend, (3, 37), 0, 4, True, k, mode, dtype=dtype)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_and_noncontiguous(backend):
    device = device_of(backend)
    s = torch.tensor(0.1, device=device)
    x = torch.empty(0, 3, device=device)
    assert soft_fake_quant(x, s, backend=backend).shape == (0, 3)
    x = torch.randn(6, 10, device=device).t()  # non-contiguous
    y = soft_fake_quant(x, s, bits=4, backend=backend)
    torch.testing.assert_close(y, soft_fake_quant_ref(x, s, -1, -8, 7), rtol=0, atol=0)
    xg = x.detach().requires_grad_()
    soft_fake_quant(xg, s, bits=4, backend=backend).sum().backward()
    assert xg.grad.shape == x.shape


def test_large_tensor_many_chunks_and_threads():
    """Crosses the CPU kernel's fixed reduction chunks; the step gradient is bit-identical
    whatever the thread count (deterministic partials)."""
    x, s = _inputs((5, 70001), None)
    _assert_matches("cpu", (5, 70001), None, 4, True, 3.0, "soft")
    results = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run("cpu", x, s, None, 4, True, 3.0, "hard")[2])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0], results[1])


def test_per_channel_long_rows_pieces_and_threads():
    """Per-channel rows longer than the CPU kernel's pieces (several pieces per row, several
    rows per step); bit-identical step gradients whatever the thread count."""
    x, s = _inputs((3, 2, 70001), 1, seed=5)
    _assert_matches("cpu", (3, 2, 70001), 1, 4, True, 3.0, "soft")
    _assert_matches("cpu", (3, 2, 70001), 0, 4, True, 0.0, "hard")
    results = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run("cpu", x, s, 1, 4, True, 3.0, "hard")[2])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("bits,signed", [(8, True), (4, True), (4, False), (2, False)])
def test_k0_forward_equals_torch_fake_quant(bits, signed):
    qn, qp = quant_grid(bits, signed)
    x = torch.randn(4099) * 3 + 0.5
    for b in qgait_cpu_backends():
        y = soft_fake_quant(x, torch.tensor(0.173), bits=bits, signed=signed, backend=b)
        ref = torch.fake_quantize_per_tensor_affine(x, 0.173, 0, qn, qp)
        assert torch.equal(y.view(torch.int32), ref.view(torch.int32)), b  # bits, incl. +0
        s = torch.rand(7) + 0.1
        xc = torch.randn(7, 33) * 3
        y = soft_fake_quant(xc, s, bits=bits, signed=signed, axis=0, backend=b)
        ref = torch.fake_quantize_per_channel_affine(xc, s, torch.zeros(7, dtype=torch.int32),
                                                     0, qn, qp)
        assert torch.equal(y.view(torch.int32), ref.view(torch.int32)), b


def qgait_cpu_backends():
    return ["reference"] + (["cpu"] if qgait.backends()["cpu"]["available"] else [])


def test_k0_gradients_equal_torch_learnable_fake_quant():
    """Equal to torch's LSQ op with grad_factor = gamma, except on the half-step bands just
    outside the grid, where torch tests round(v) against the grid and this spec tests v."""
    qn, qp = -8, 7
    s0 = 0.21
    x = torch.linspace(-3.0, 3.0, 3001)
    v = x * (1.0 / torch.tensor(s0))
    band = ((v < qn) & (v >= qn - 0.5)) | ((v > qp) & (v < qp + 0.5))
    x = x[~band]
    gamma = default_gamma(x.numel(), 1, qp)
    for b in qgait_cpu_backends():
        xa = x.clone().requires_grad_()
        sa = torch.tensor([s0], requires_grad=True)
        y = soft_fake_quant(xa, sa, bits=4, k=0.0, backend=b)
        gy = torch.cos(torch.arange(x.numel(), dtype=torch.float32))
        dx, ds = torch.autograd.grad(y, (xa, sa), gy)
        xt = x.clone().requires_grad_()
        st = torch.tensor([s0], requires_grad=True)
        yt = torch._fake_quantize_learnable_per_tensor_affine(xt, st, torch.tensor([0.0]), qn, qp,
                                                             gamma)
        dxt, dst = torch.autograd.grad(yt, (xt, st), gy)
        assert torch.equal(y, yt.detach()), b
        torch.testing.assert_close(dx, dxt, rtol=0, atol=0)
        torch.testing.assert_close(ds, dst, rtol=1e-5, atol=1e-6)


def test_reference_gradcheck_soft_mode_float64():
    """In soft mode the hand-written gradients are the true gradients of sigma(c) * s:
    finite differences must agree (float64, points away from the clamp edges)."""
    torch.manual_seed(0)
    x = (torch.rand(40, dtype=torch.float64) * 5.6 - 2.8)  # v within (-8, 7) for s = 0.4
    for axis, s in [(None, torch.tensor(0.4, dtype=torch.float64)),
                    (0, torch.tensor([0.4, 0.45, 0.5, 0.42], dtype=torch.float64))]:
        xx = x.reshape(4, 10).clone().requires_grad_()
        ss = s.clone().requires_grad_()
        for k in (0.0, 1.5, 5.0):
            def f(a, b):
                return soft_fake_quant(a, b, bits=4, axis=axis, k=k, mode="soft", gamma=1.0,
                                       backend="reference")
            assert torch.autograd.gradcheck(f, (xx, ss), eps=1e-6, atol=1e-6)


def test_surrogate_gradient_mean_is_one():
    """g(c) averages to exactly 1 over one step for every k (the STE's slope)."""
    c = torch.linspace(0, 1, 200001, dtype=torch.float64)[:-1] + 2.0
    for k in (0.5, 2.0, 8.0, 20.0):
        x = c.clone().requires_grad_()
        soft_fake_quant(x, torch.tensor(1.0, dtype=torch.float64), bits=4, k=k,
                        backend="reference").sum().backward()
        assert abs(float(x.grad.mean()) - 1.0) < 1e-4


@pytest.mark.parametrize("backend", backend_params())
def test_nan_propagates(backend):
    device = device_of(backend)
    x = torch.tensor([0.1, float("nan"), -0.3], device=device, requires_grad=True)
    y = soft_fake_quant(x, torch.tensor(0.1, device=device), bits=4, k=2.0, mode="soft",
                        backend=backend)
    assert torch.isnan(y[1]) and not torch.isnan(y[0]) and not torch.isnan(y[2])
    y.sum().backward()
    assert torch.isnan(x.grad[1])


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_bad_inputs_name_the_op(backend):
    x = torch.randn(4, 3)
    s = torch.tensor(0.1)
    cases = [
        (dict(x=torch.ones(4, dtype=torch.int32), scale=s), "floating"),
        (dict(x=x, scale=torch.tensor(0.0)), "> 0"),
        (dict(x=x, scale=torch.tensor(-1.0)), "> 0"),
        (dict(x=x, scale=torch.tensor(float("nan"))), "> 0"),
        (dict(x=x, scale=torch.tensor(float("inf"))), "> 0"),
        (dict(x=x, scale=torch.rand(3) + 0.1), "one element"),
        (dict(x=x, scale=torch.rand(5) + 0.1, axis=0), "shape"),
        (dict(x=x, scale=torch.rand(4) + 0.1, axis=2), "out of range"),
        (dict(x=x, scale=s, bits=1), "bits"),
        (dict(x=x, scale=s, bits=9), "bits"),
        (dict(x=x, scale=s, k=-1.0), "k"),
        (dict(x=x, scale=s, k=float("inf")), "k"),
        (dict(x=x, scale=s, mode="round"), "mode"),
        (dict(x=x, scale=torch.tensor(0.1, device="meta")), "device"),
    ]
    for kwargs, msg in cases:
        with pytest.raises((ValueError, TypeError, RuntimeError), match="qgait::soft_fake_quant") as e:
            soft_fake_quant(backend=backend, **kwargs)
        assert msg in str(e.value), (kwargs, str(e.value))


def test_step_values_checked_once_per_version(monkeypatch):
    """A step found valid is not checked again until it is written (in place, by an optimizer
    step or load_state_dict); a bad value written later is still caught."""
    from qgait.ops import soft_quant as sq
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(sq.torch, "isfinite", lambda t: calls.append(1) or isfinite(t))
    x = torch.randn(4, 3)
    s = torch.nn.Parameter(torch.tensor(0.1))
    for _ in range(3):
        soft_fake_quant(x, s, bits=4, backend="reference")
    assert len(calls) == 1                     # one check for three calls
    opt = torch.optim.SGD([s], lr=1.0)
    s.grad = torch.tensor(0.2)
    opt.step()                                 # 0.1 - 0.2: in place, a new version
    with pytest.raises(ValueError, match="scale must be finite and > 0, got \\[-0.1"):
        soft_fake_quant(x, s, bits=4, backend="reference")
    with torch.no_grad():
        s.fill_(0.25)
    soft_fake_quant(x, s, bits=4, backend="reference")
    with torch.no_grad():
        s.fill_(float("nan"))
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        soft_fake_quant(x, s, bits=4, backend="reference")
    n = len(calls)
    with torch.inference_mode():               # inference tensors have no version: always
        t = torch.tensor(0.1)
        soft_fake_quant(x, t, bits=4, backend="reference")
        soft_fake_quant(x, t, bits=4, backend="reference")
    assert len(calls) == n + 2


def test_cpp_op_checks_directly():
    """The C++ kernels validate too (for callers of torch.ops.qgait.* that skip Python)."""
    if not qgait.backends()["cpu"]["available"]:
        pytest.skip("qgait._C not built")
    op = torch.ops.qgait.soft_fake_quant
    x = torch.randn(8)
    with pytest.raises(RuntimeError, match="qgait::soft_fake_quant: scale must be finite"):
        op(x, torch.tensor(-1.0), -1, -8, 7, 0.0, False, 1.0)
    with pytest.raises(RuntimeError, match="qgait::soft_fake_quant: x must be float32"):
        op(x.double(), torch.tensor(1.0), -1, -8, 7, 0.0, False, 1.0)
    with pytest.raises(RuntimeError, match="per-channel scale"):
        op(x.reshape(2, 4), torch.ones(3), 0, -8, 7, 0.0, False, 1.0)
    with pytest.raises(RuntimeError, match="invalid grid"):
        op(x, torch.tensor(1.0), -1, 7, -8, 0.0, False, 1.0)


def test_backend_errors_list_every_reason(monkeypatch):
    x = torch.randn(4, dtype=torch.float64)
    with pytest.raises(RuntimeError) as e:
        soft_fake_quant(x, torch.tensor(0.1), backend="cpu")
    assert "qgait::soft_fake_quant" in str(e.value) and "float64" in str(e.value)
    monkeypatch.setenv("QGAIT_BACKEND", "reference")
    y = soft_fake_quant(x, torch.tensor(0.1, dtype=torch.float64))
    assert y.dtype == torch.float64
    monkeypatch.setenv("QGAIT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        soft_fake_quant(x, torch.tensor(0.1))


def test_opcheck():
    if not qgait.backends()["cpu"]["available"]:
        pytest.skip("qgait._C not built")
    x = torch.randn(3, 5, 7, requires_grad=True)
    for s, axis in [(torch.tensor(0.2), -1), (torch.rand(5) + 0.1, 1)]:
        s = s.requires_grad_()
        for k, soft in [(0.0, False), (3.0, True)]:
            torch.library.opcheck(torch.ops.qgait.soft_fake_quant.default,
                                  (x, s, axis, -8, 7, k, soft, 0.5))
        gy = torch.randn(3, 5, 7)
        torch.library.opcheck(torch.ops.qgait.soft_fake_quant_backward.default,
                              (gy, x.detach(), s.detach(), axis, -8, 7, 2.0, False, 0.5, True,
                               True))


def test_opcheck_triton(triton_device):
    x = torch.randn(2, 3, 5, device=triton_device, requires_grad=True)
    s = (torch.rand(3, device=triton_device) + 0.1).requires_grad_()
    utils = torch.library._OPCHECK_DEFAULT_UTILS
    if triton_device.type == "cpu":
        # AOT tracing enters the triton_op and would run the interpreter on fake tensors
        utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.qgait.soft_fake_quant_triton.default,
                          (x, s, 1, -8, 7, 3.0, True, 0.5), test_utils=utils)


SYMBOLIC_TRACE = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
import qgait
from qgait.kernels import soft_quant as K

def ds_partials(x):  # the backward launcher's shape math and its reduction of the partials
    outer, C, inner = K._layout(x, 1)
    br, bi, nb, n_prog = K._grid(outer * C, inner)
    return K.partials_buffer(x, outer, C, nb, True).fill_(1.0).sum(dim=(0, 2))

g = make_fx(ds_partials, tracing_mode="symbolic")(torch.randn(2, 3, 5))
print(g(torch.randn(4, 3, 7)).tolist())
"""


def test_triton_backward_launcher_traces_with_symbolic_shapes():
    """torch.compile / AOT autograd trace the Triton launcher with symbolic shapes: its ds
    partials must not need sympy to prove rows * nb == outer * C * nb (the old flat buffer
    and view made opcheck run past 120 s on an H200; traced here on the CPU, no kernel runs).
    A subprocess, so that a regression fails at the timeout instead of hanging the suite."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", SYMBOLIC_TRACE], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[4.0, 4.0, 4.0]"  # outer * nb = 4 * 1


# ---- the Triton kernels as a GPU compiles them ------------------------------------------------
# NaN patterns a GPU produces (0x7FFFFFFF is its canonical NaN), quiet / signalling, both signs;
# then the values next to every rounding decision.
BF16_PATTERNS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001,
                 0x7FBFFFFF, 0x7F80FFFF, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF,
                 0x7F7F8000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x00000001,
                 0x80000001, 0x00008000, 0x00018000, 0x80000000, 0x00000000, 0x3F800000]


def test_triton_bf16_rounding_bit_patterns(triton_device):
    """The kernels' fp32 -> bf16 rounding on exact bit patterns, against torch's conversion:
    NaN stays NaN (the old carry turned 0x7FFFFFFF into -0.0 and 0x7F800001 into inf)."""
    import triton_probes

    g = torch.Generator().manual_seed(0)
    rand = torch.randint(-2**31, 2**31, (200,), generator=g, dtype=torch.int64)
    bits = torch.tensor(BF16_PATTERNS, dtype=torch.int64)
    u32 = torch.cat([bits, rand]).to(torch.int32)  # the low 32 bits
    y = torch.empty(u32.numel(), dtype=torch.bfloat16, device=triton_device)
    triton_probes.bf16_round_bits[(1,)](u32.to(triton_device), y, u32.numel(), BLOCK=256)
    f = u32.view(torch.float32)
    want = f.to(torch.bfloat16)
    got = y.cpu()
    assert torch.equal(got.isnan(), f.isnan())
    ok = ~f.isnan()
    assert torch.equal(got[ok].view(torch.int16), want[ok].view(torch.int16))
    # a NaN comes out as the quiet NaN 0x7FC0 on every machine
    assert (got[~ok].view(torch.int16) == 0x7FC0).all()


def test_triton_tile_offsets_are_int64(triton_device):
    """Program ids near 2^31 / 1024 tiles of a per-tensor input of 2^33 elements: the element
    offsets are exact (an int32 ``blk * BLOCK`` wrapped into out-of-bounds stores)."""
    import triton
    import triton_probes

    from qgait.kernels import soft_quant as tk

    cases = [  # (rows, inner, pid)
        (1, 2**33, 2**23 - 1),            # per tensor: the last tile of 2^33 elements
        (1, 2**31 + 5, 2**21),            # the tile straddling 2^31, partly masked
        (3 * 2**20, 2**12, 2**22 + 7),    # per channel, rows * inner = 3 * 2^32
        (2**31 + 3, 1, 2**21),            # last axis: 1024 rows of one element
    ]
    for rows, inner, pid in cases:
        br, bi = tk.tile_shape(rows, inner)
        nb = triton.cdiv(inner, bi)
        assert pid < triton.cdiv(rows, br) * nb < 2**31
        out = torch.empty(br * bi, dtype=torch.int64, device=triton_device)
        triton_probes.tile_offsets[(1,)](out, pid, nb, rows, inner, BR=br, BI=bi)
        r = (pid // nb) * br + torch.arange(br, dtype=torch.int64)[:, None]
        c = (pid % nb) * bi + torch.arange(bi, dtype=torch.int64)[None, :]
        want = torch.where((r < rows) & (c < inner), r * inner + c, -1).flatten()
        assert torch.equal(out.cpu(), want), (rows, inner, pid)
        assert int(want.max()) >= 2**31


def test_triton_tile_shape_follows_layout():
    """One program's tile follows the layout: rows of 27 take 32 x 32 tiles, the last axis
    1024 rows of one element, a per-tensor input 1024 elements of its one row."""
    pytest.importorskip("triton")
    from qgait.kernels.soft_quant import BLOCK, tile_shape

    assert tile_shape(4096, 27) == (32, 32)
    assert tile_shape(10**6, 1) == (BLOCK, 1)
    assert tile_shape(1, 10**6) == (1, BLOCK)
    assert tile_shape(3, 5) == (4, 8)           # small: no tile larger than the tensor
    for rows, inner in [(64, 27), (7, 1), (1, 3), (5, 2000)]:
        br, bi = tile_shape(rows, inner)
        assert br * bi <= BLOCK and bi >= min(inner, BLOCK)


@pytest.mark.parametrize("axis,shape", [(1, (3, 8, 27)), (2, (5, 4, 3)), (None, (5, 3, 7))])
def test_triton_layouts_match_reference(triton_device, axis, shape):
    """The tiled kernels on the layouts the tile shape is chosen for (inner = 27, last axis,
    per tensor), hard mode bit-exact, forward and both gradients."""
    for mode, k in [("hard", 0.0), ("soft", 3.0)]:
        x, s = _inputs(shape, axis, 4, True, seed=3, device=triton_device)
        y, dx, ds = _run("triton", x, s, axis, 4, True, k, mode)
        yr, dxr, dsr = _run("reference", x, s, axis, 4, True, k, mode)
        if mode == "hard":
            assert torch.equal(y, yr)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ds, dsr, rtol=1e-5, atol=1e-5 * float(dsr.abs().max() + 1))


def test_triton_launchers_do_not_divide_in_torch(triton_device):
    """1 / s is computed in the kernels (tl.div_rn): a torch division in the launcher is what
    Inductor would compile with an approximate division on a GPU."""
    from triton_probes import DispatchRecord as Record

    x = torch.randn(4, 6, device=triton_device)
    s = torch.rand(6, device=triton_device) + 0.1
    with Record() as rec:
        torch.ops.qgait.soft_fake_quant_triton(x, s, 1, -8, 7, 2.0, False, 1.0)
        torch.ops.qgait.soft_fake_quant_triton_backward(x, x, s, 1, -8, 7, 2.0, False, 1.0,
                                                        True, True)
    assert not rec.ops & {"div", "reciprocal", "true_divide"}, rec.ops


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_triton_kernels_assert_the_step(triton_device, triton_debug, bad):
    """A bad step reaching the Triton kernels (past the Python check, which reads values only
    on the CPU) fails their device-side assert, forward and backward, with no host sync."""
    if not triton_debug:  # on a GPU an assert poisons the process's CUDA context
        code = ("import torch, qgait\n"
                "x = torch.randn(4, 3, device='cuda')\n"
                f"s = torch.tensor([0.1, {bad!r}, 0.2], device='cuda')\n"
                "torch.ops.qgait.soft_fake_quant_triton(x, s, 1, -8, 7, 0.0, False, 1.0)\n"
                "torch.cuda.synchronize()\n").replace("nan", "float('nan')").replace(
                    "inf", "float('inf')")
        import subprocess
        import sys
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode != 0 and "assert" in (r.stdout + r.stderr).lower(), r.stderr[-2000:]
        return
    x = torch.randn(4, 3)
    s = torch.tensor([0.1, bad, 0.2])
    with pytest.raises(Exception, match="scale must be finite and > 0"):
        torch.ops.qgait.soft_fake_quant_triton(x, s, 1, -8, 7, 0.0, False, 1.0)
    with pytest.raises(Exception, match="scale must be finite and > 0"):
        torch.ops.qgait.soft_fake_quant_triton_backward(x, x, s, 1, -8, 7, 0.0, False, 1.0,
                                                        True, True)
    y = torch.ops.qgait.soft_fake_quant_triton(x, s.abs().clamp(0.1, 1.0).nan_to_num(0.1), 1,
                                               -8, 7, 0.0, False, 1.0)
    assert y.shape == x.shape  # good steps pass the same assert


def test_torch_compile_fullgraph():
    if not qgait.backends()["cpu"]["available"]:
        pytest.skip("qgait._C not built")
    x = torch.randn(4, 6, 9, requires_grad=True)
    s = (torch.rand(6) + 0.1).requires_grad_()

    def f(x, s):
        return soft_fake_quant(x * 2, s, bits=4, axis=1, k=2.0, backend="cpu").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, s)
    gx, gs = torch.autograd.grad(out, (x, s))
    ref = f(x, s)
    rx, rs = torch.autograd.grad(ref, (x, s))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gs, rs)


def test_backward_reference_matches_autograd_of_soft_forward():
    """A second, independent check of the backward formulas: autograd through an explicit
    soft forward written with torch ops (float64)."""
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    s = torch.tensor(0.3, dtype=torch.float64)
    k = 3.0
    xx, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
    c = torch.clamp(xx / ss, -8, 7)
    fl = torch.floor(c).detach()
    sig = fl + 0.5 + torch.tanh(k * (c - fl - 0.5)) / (2 * math.tanh(k / 2))
    (sig * ss).sum().backward()
    dx, ds = soft_fake_quant_backward_ref(torch.ones_like(x), x, s, -1, -8, 7, k, True, 1.0)
    torch.testing.assert_close(dx, xx.grad)
    torch.testing.assert_close(ds, ss.grad)

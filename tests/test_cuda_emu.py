"""Every CUDA kernel, executed on the CPU by the emulation harness (tests/cuda_emu.py,
csrc/cuda/emu/; docs/cuda_emulation.md), against the CPU kernel and the pure-PyTorch references.

The real csrc/cuda/*.cu sources are built as host C++ with AddressSanitizer + UBSan (one fiber
per CUDA thread, garbage-filled shared memory and scratch, outputs pre-filled with NaN / -7,
grids shrunk so that grid-stride loops and chunked reductions loop); the ThreadSanitizer build
(one host thread per CUDA thread) runs behind the ``tsan`` marker. Mutation tests show that a
broken tail check, a missing barrier and an oversized block are caught. Exact where the math
is exact: soft fake-quant y and dx (bit for bit with the CPU kernel), maxima and arg-max
indices, packed conv3d (integers and the fp32 epilogue).

On a machine with a GPU, ``QGAIT_EMU_DRIVER=cuda`` runs the comparison tests on the device
instead: the same driver and kernels built by nvcc with setup.py's flags.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

import cuda_emu
from qgait import _ext
from qgait.ops.packed_conv3d import packed_conv3d_ref
from qgait.ops.pooling import set_pool_hpp_ref, temporal_pool_ref
from qgait.ops.soft_quant import _ref_parts, _tanh_consts
from qgait.quant import pack_weight

pytestmark = pytest.mark.skipif(cuda_emu.compiler() is None, reason="no C++ compiler")
needs_c = pytest.mark.skipif(not _ext.HAS_C, reason="qgait._C (the CPU kernels) is not built")

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f16", "bf16"]


def _build(variant, sources=None):
    try:
        return cuda_emu.build(variant, sources)
    except cuda_emu.SanitizerMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def asan():
    return _build("asan")


@pytest.fixture(scope="module")
def asan_full():
    return _build("asan_full")


# The comparisons run on the emulation, or with QGAIT_EMU_DRIVER=cuda on a GPU: the same
# driver and kernels built by nvcc (setup.py's flags), the same requests and checks.
ON_GPU = os.environ.get("QGAIT_EMU_DRIVER", "") == "cuda"


@pytest.fixture(scope="module")
def kernels():
    return _build("cuda") if ON_GPU else _build("asan")


@pytest.fixture(scope="module")
def kernels_full():
    return _build("cuda") if ON_GPU else _build("asan_full")


@pytest.fixture(scope="module")
def tsan(request):
    """The ThreadSanitizer build: only when asked for (``-m tsan``), it costs minutes."""
    if "tsan" not in (request.config.getoption("-m") or ""):
        pytest.skip("ThreadSanitizer runs of the CUDA kernels: select them with -m tsan")
    return _build("tsan")


def _bits_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    """Equal bit for bit, except that NaNs only need the same positions."""
    a, b = a.float(), b.float()
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb), f"{what}: NaN positions differ ({int(na.sum())} vs {int(nb.sum())})"
    ia, ib = a[~na].view(torch.int32), b[~nb].view(torch.int32)
    bad = (ia != ib).nonzero().flatten()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {ia.numel()} differ, e.g. "
                              f"{a[~na][bad[:4]].tolist()} vs {b[~nb][bad[:4]].tolist()}")


# =============================================================================================
# Soft fake-quant: forward (flat grid-stride, 4 step layouts, vector / scalar / tail) and
# backward (rows kernel with several segments per row, columns kernel with several chunks,
# fixed-order step-gradient sums).
# =============================================================================================
# (shape, axis): per tensor, per channel with inner % 8 == 0 (Row), channels last (Last),
# any other inner (Any), rows backward (inner >= 128: several 64-element segments in the small
# grid build), columns backward (inner < 128, outer over several 16-row chunks), tails.
SFQ_LAYOUTS = [
    ((3, 5, 37), -1),
    ((2, 3, 16), 1),
    ((40, 5), 1),
    ((2, 5, 7), 1),
    ((2, 3, 200), 1),
    ((70, 3, 3), 1),
    ((3,), -1),          # fewer elements than one vector: tail only
    ((1, 1, 131), -1),   # a vector body, a tail, and rows backward with a short last segment
    ((4, 6), 0),         # axis 0, inner 6
]
# (qn, qp, k, soft): stage 1 (k = 0, straight-through), hard and soft stage 2 (k = 4)
SFQ_MODES = [(-128, 127, 0.0, False), (0, 15, 4.0, False), (-8, 7, 4.0, True), (0, 15, 0.0, True)]


def _layout(shape, axis):
    n = 1
    for s in shape:
        n *= s
    if axis < 0:
        return 1, 1, n
    outer = 1
    for s in shape[:axis]:
        outer *= s
    inner = 1
    for s in shape[axis + 1:]:
        inner *= s
    return outer, shape[axis], inner


def _sfq_inputs(shape, axis, qn, qp, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    C = 1 if axis < 0 else shape[axis]
    scale = torch.rand(C, generator=g) * 0.05 + 0.02
    scale[0] = 0.25  # a power of two: exact ties v = m + 1/2
    s = scale.reshape([-1] + [1] * (len(shape) - axis - 1)) if axis >= 0 else scale[0]
    x = (torch.randn(shape, generator=g) * (qp - qn) / 2 + (qp + qn) / 2) * s
    flat = x.view(-1)
    flat[:: 11] = (torch.randint(2 * qn - 2, 2 * qp + 3, flat[::11].shape, generator=g) / 2.0
                   * (s.reshape(-1)[0] if axis < 0 else 0.25))
    if flat.numel() > 20:
        flat[3], flat[7], flat[12] = float("nan"), float("inf"), -float("inf")
    x = x.to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    return x, gy, scale


def _consts(qn, qp, k, soft):
    ts, gs = (0.0, 1.0) if k == 0 else _tanh_consts(k)
    return (qn, qp, k, ts, gs, soft, k == 0)


@needs_c
@pytest.mark.parametrize("dtype", FLOATS, ids=DT_IDS)
def test_soft_fake_quant_matches_cpu_kernel(kernels, dtype):
    """y bit for bit with the CPU kernel (itself bit-equal to torch's fake-quant in hard mode),
    dx bit for bit, ds within the reordering of a float sum, over every layout and mode, with
    16-byte aligned (vector path) and misaligned (scalar path) buffers."""
    b = cuda_emu.Batch()
    cases = []
    for li, (shape, axis) in enumerate(SFQ_LAYOUTS):
        for mi, (qn, qp, k, soft) in enumerate(SFQ_MODES):
            x, gy, scale = _sfq_inputs(shape, axis, qn, qp, dtype, seed=li * 10 + mi)
            outer, C, inner = _layout(shape, axis)
            P = _consts(qn, qp, k, soft)
            gamma = 0.37
            for mis in (0, x.element_size()):
                f = b.sfq_fwd(x, scale, outer, C, inner, P, misalign=mis)
                bw = b.sfq_bwd(gy, x, scale, outer, C, inner, P, gamma, misalign=mis)
                # the two single-output variants of the backward
                only_dx = b.sfq_bwd(gy, x, scale, outer, C, inner, P, gamma, need_ds=False,
                                    misalign=mis)
                only_ds = b.sfq_bwd(gy, x, scale, outer, C, inner, P, gamma, need_dx=False,
                                    misalign=mis)
                cases.append((shape, axis, qn, qp, k, soft, mis, x, gy, scale, gamma, f, bw,
                              only_dx, only_ds))
    b.run(kernels)
    for (shape, axis, qn, qp, k, soft, mis, x, gy, scale, gamma, f, bw, only_dx,
         only_ds) in cases:
        case = f"{shape} axis={axis} grid=[{qn},{qp}] k={k} soft={soft} misalign={mis}"
        sc = scale if axis >= 0 else scale.reshape(())
        assert f.rc == 0 and bw.rc == 0 and only_dx.rc == 0 and only_ds.rc == 0, case
        y_cpu = torch.ops.qgait.soft_fake_quant(x, sc, axis, qn, qp, k, soft, gamma)
        _bits_equal(f.out["y"], y_cpu, f"y {case}")
        fin = torch.isfinite(x.float())
        xf = torch.where(fin, x, torch.zeros_like(x))  # ds over finite x
        dx_cpu, _ = torch.ops.qgait.soft_fake_quant_backward(gy, x, sc, axis, qn, qp, k, soft,
                                                             gamma, True, False)
        _bits_equal(bw.out["dx"], dx_cpu, f"dx {case}")
        _bits_equal(only_dx.out["dx"], dx_cpu, f"dx (no ds) {case}")
        # ds: the NaN / inf elements make ds NaN for their step; the sums of the others are
        # compared separately below, so here only NaN-ness and finite values' closeness.
        _, ds_cpu = torch.ops.qgait.soft_fake_quant_backward(gy, x, sc, axis, qn, qp, k, soft,
                                                             gamma, False, True)
        v, c, g, q, s = _ref_parts(x.float(), sc, axis, qn, qp, k, soft)
        term = gy.float() * torch.where(v < qn, float(qn), torch.where(v > qp, float(qp),
                                                                       q - v * g))
        dims = [d for d in range(x.dim()) if d != axis] if axis >= 0 else list(range(x.dim()))
        tol = (term.abs().double().nan_to_num(0, 0, 0).sum(dim=dims) * gamma * 1e-5
               + 1e-30).reshape(-1).float()
        for got in (bw.out["ds"], only_ds.out["ds"]):
            want = ds_cpu.reshape(-1).float()
            assert torch.equal(torch.isnan(got), torch.isnan(want)), f"ds NaN {case}"
            ok = torch.isnan(want) | ((got - want).abs() <= tol)
            assert bool(ok.all()), f"ds {case}: {got.tolist()} vs {want.tolist()}"
        del xf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_soft_fake_quant_production_grid(kernels_full, dtype):
    """The same kernels with the production grid limits (one block per step segment), against
    the pure-PyTorch reference: y exact in hard mode; dx / ds within fp32 rounding of the
    polynomial tanh."""
    b = cuda_emu.Batch()
    cases = []
    # (2, 3, 2100): 256-thread row blocks (eight warps in block_sum)
    for li, (shape, axis) in enumerate([((3, 5, 37), -1), ((2, 3, 200), 1), ((70, 3, 3), 1),
                                        ((2, 3, 2100), 1)]):
        for qn, qp, k, soft in SFQ_MODES[:2]:
            x, gy, scale = _sfq_inputs(shape, axis, qn, qp, dtype, seed=li)
            x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
            outer, C, inner = _layout(shape, axis)
            P = _consts(qn, qp, k, soft)
            cases.append((x, gy, scale, axis, qn, qp, k, soft,
                          b.sfq_fwd(x, scale, outer, C, inner, P),
                          b.sfq_bwd(gy, x, scale, outer, C, inner, P, 1.0)))
    b.run(kernels_full)
    from qgait.ops.soft_quant import soft_fake_quant_backward_ref, soft_fake_quant_ref

    for x, gy, scale, axis, qn, qp, k, soft, f, bw in cases:
        sc = scale if axis >= 0 else scale.reshape(())
        y = soft_fake_quant_ref(x, sc, axis, qn, qp, k, soft)
        if k == 0:
            _bits_equal(f.out["y"], y, "y vs reference")
        else:
            torch.testing.assert_close(f.out["y"], y, rtol=0, atol=1e-2 * float(scale.max()))
        dx, ds = soft_fake_quant_backward_ref(gy, x, sc, axis, qn, qp, k, soft, 1.0)
        torch.testing.assert_close(bw.out["dx"].float(), dx.float(), rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(bw.out["ds"], ds.reshape(-1), rtol=1e-3, atol=1e-2)


@needs_c
def test_soft_fake_quant_long_step_sums(kernels):
    """Step gradients summed from more than 256 partials, so that sfq_ds_finish_kernel runs
    256 threads (eight warps, fp64 shuffles): per tensor (rows kernel, 313 segments of 64 in the
    small-grid build) and channels-last columns (38 chunks of 16 rows x 8 columns); and the
    forward over enough vectors for several grid-stride rounds."""
    b = cuda_emu.Batch()
    cases = []
    for shape, axis in (((20000,), -1), ((600, 2, 8), 1)):
        x, gy, scale = _sfq_inputs(shape, axis, -8, 7, torch.float32, seed=3)
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        outer, C, inner = _layout(shape, axis)
        P = _consts(-8, 7, 4.0, True)
        cases.append((x, gy, scale, axis, b.sfq_bwd(gy, x, scale, outer, C, inner, P, 0.5),
                      b.sfq_fwd(x, scale, outer, C, inner, P)))
    b.run(kernels)
    for x, gy, scale, axis, r, f in cases:
        sc = scale if axis >= 0 else scale.reshape(())
        # the forward's vector loop takes several grid-stride rounds (3 blocks in this build)
        _bits_equal(f.out["y"], torch.ops.qgait.soft_fake_quant(x, sc, axis, -8, 7, 4.0, True,
                                                                0.5), "y")
        dx_cpu, ds_cpu = torch.ops.qgait.soft_fake_quant_backward(gy, x, sc, axis, -8, 7, 4.0,
                                                                  True, 0.5, True, True)
        _bits_equal(r.out["dx"], dx_cpu, f"dx {tuple(x.shape)}")
        torch.testing.assert_close(r.out["ds"], ds_cpu.reshape(-1).float(), rtol=1e-5, atol=1e-4)


def test_soft_fake_quant_bad_step_asserts_once(asan):
    """A step <= 0 or non-finite trips the device-side assert: the launcher returns
    cudaErrorAssert (710), later launches fail until the context is reset, and the bad step is
    reported once, not by every thread."""
    x = torch.randn(4, 300)
    P = _consts(-128, 127, 0.0, False)
    b = cuda_emu.Batch()
    bad = b.sfq_fwd(x, torch.tensor([0.1, -1.0, 0.2, float("nan")]), 1, 4, 300, P)
    after = b.sfq_fwd(x, torch.tensor([0.1]), 1, 1, 1200, P)
    b.reset()
    good = b.sfq_fwd(x, torch.tensor([0.1]), 1, 1, 1200, P)
    p = b.run(asan)
    assert bad.rc == 710 and after.rc == 710 and good.rc == 0
    assert "device-side assert" not in p.stdout
    reports = re.findall(r"qgait::soft_fake_quant: scale\[\d+\] = \S+;", p.stdout + p.stderr)
    assert len(reports) == 1, f"{len(reports)} reports of the bad step:\n{p.stdout[-2000:]}"
    assert p.stderr.count("Assertion") == 1, p.stderr[-2000:]
    _bits_equal(good.out["y"], torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127), "y")


# =============================================================================================
# Pooling: temporal max (+ arg-max), fused horizontal pyramid pooling (+ strip arg-max) and both
# backwards; with and without indices, packed sequences (seqL), ties and NaN.
# =============================================================================================
def _pool_input(shape, kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: many ties, first index must win
        x = torch.randint(-2, 3, shape, generator=g).float()
    else:
        x = torch.randn(shape, generator=g)
    if kind == "nan":
        flat = x.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 37)]] = float("nan")
    return x.to(dtype)


# (shape, seqL, bins): gait-like, odd strips (H not divisible by the bins), T = 1, packed
# sequences, one column, a map taller than 256 threads' worth of rows
POOL_CASES = [
    ((2, 3, 4, 16, 11), None, (16, 8, 4, 2, 1)),
    ((1, 2, 7, 9, 5), [3, 4], (4, 2, 1)),
    ((2, 2, 1, 6, 4), None, (4, 3, 1)),
    ((1, 3, 6, 5, 1), [1, 2, 3], (5, 2)),
    ((1, 1, 3, 40, 9), None, (16, 1)),
]
MODES = [("mean+max", 0), ("max", 1), ("mean", 2)]


def _cpu_sph(x, seqL, bins, mode):
    return torch.ops.qgait.set_pool_hpp(x, list(seqL or []), list(bins), mode, True)


@needs_c
@pytest.mark.parametrize("kind", ["randn", "ties", "nan"])
@pytest.mark.parametrize("dtype", FLOATS, ids=DT_IDS)
def test_pooling_matches_reference(kernels, dtype, kind):
    b = cuda_emu.Batch()
    cases = []
    for ci, (shape, seqL, bins) in enumerate(POOL_CASES):
        x = _pool_input(shape, kind, dtype, seed=ci)
        N, C, T, H, W = shape
        NO, B = len(seqL) if seqL else N, sum(bins)
        for mname, mode in MODES:
            with_t, with_s = T > 1, mode != 2
            fwd = b.pool_fwd(x, seqL, bins, mode, True, (with_t, with_s))
            fwd_noidx = b.pool_fwd(x, seqL, bins, mode, True, (False, False))
            out_c, targ_c, sarg_c = _cpu_sph(x, seqL, bins, mode)
            g = torch.randn(NO, C, B, generator=torch.Generator().manual_seed(ci)).to(dtype)
            bwd = b.pool_bwd(g, targ_c if with_t else None, sarg_c if with_s else None, shape,
                             seqL, bins, mode, True)
            cases.append(("sph", shape, seqL, bins, mname, mode, x, fwd, fwd_noidx, g, bwd,
                          (out_c, targ_c, sarg_c)))
        # temporal pooling alone (hpp = False: no shared memory)
        fwd = b.pool_fwd(x, seqL, (), 0, False, (T > 1, False))
        fwd_noidx = b.pool_fwd(x, seqL, (), 0, False, (False, False))
        out_c, targ_c = torch.ops.qgait.temporal_pool(x, list(seqL or []), True)
        g = torch.randn(NO, C, H, W, generator=torch.Generator().manual_seed(ci)).to(dtype)
        bwd = b.pool_bwd(g, targ_c if T > 1 else None, None, shape, seqL, (), 0, False)
        cases.append(("tp", shape, seqL, (), "max", 1, x, fwd, fwd_noidx, g, bwd,
                      (out_c, targ_c, None)))
    b.run(kernels)
    low = dtype != torch.float32
    for op, shape, seqL, bins, mname, mode, x, fwd, fwd_noidx, g, bwd, cpu in cases:
        case = f"{op} {shape} seqL={seqL} bins={bins} mode={mname} {kind}"
        assert fwd.rc == 0 and fwd_noidx.rc == 0 and bwd.rc == 0, case
        ref = set_pool_hpp_ref(x, seqL, bins, mname) if op == "sph" else temporal_pool_ref(x, seqL)
        out = fwd.out["out"]
        assert torch.equal(out, fwd_noidx.out["out"]) or torch.equal(
            torch.isnan(out), torch.isnan(fwd_noidx.out["out"])), case
        if mode == 1:  # maxima are exact (NaN positions included)
            _bits_equal(out, ref, f"out {case}")
        else:
            tol = dict(rtol=1e-2, atol=1e-2) if low else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out, ref, equal_nan=True, **tol,
                                       msg=lambda m: f"{case}: {m}")
        out_c, targ_c, sarg_c = cpu
        if shape[2] > 1:  # arg-max indices: the CPU kernel's (torch.max's first index / NaN)
            assert torch.equal(fwd.out["targ"], targ_c), f"targ {case}"
        if op == "sph" and mode != 2:
            assert torch.equal(fwd.out["sarg"], sarg_c), f"sarg {case}"
        # backward against the CPU kernel's, from the same indices
        if op == "sph":
            dx_c = torch.ops.qgait.set_pool_hpp_backward(
                g, targ_c, sarg_c, list(shape), list(seqL or []), list(bins), mode)
        else:
            dx_c = torch.ops.qgait.temporal_pool_backward(g, targ_c, list(shape), list(seqL or []))
        if mode == 1:
            _bits_equal(bwd.out["dx"], dx_c, f"dx {case}")
        else:
            tol = dict(rtol=1e-2, atol=1e-3) if low else dict(rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(bwd.out["dx"], dx_c, **tol, msg=lambda m: f"dx {case}: {m}")


def test_pooling_backward_against_autograd(kernels):
    """dx of the fused op equals autograd through the reference (fp32, no ties / NaN)."""
    shape, seqL, bins = (1, 2, 5, 8, 3), [2, 3], (4, 2, 1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    N, C, T, H, W = shape
    b = cuda_emu.Batch()
    cases = []
    NO, B = len(seqL), sum(bins)
    for mname, mode in MODES:
        fwd = b.pool_fwd(x, seqL, bins, mode, True, (True, mode != 2))
        cases.append((mname, mode, fwd))
    b.run(kernels)
    b2 = cuda_emu.Batch()
    grads = []
    for mname, mode, fwd in cases:
        g = torch.randn(NO, C, B, generator=torch.Generator().manual_seed(mode))
        bwd = b2.pool_bwd(g, fwd.out["targ"], fwd.out["sarg"] if mode != 2 else None, shape,
                          seqL, bins, mode, True)
        grads.append((mname, g, bwd))
    b2.run(kernels)
    for mname, g, bwd in grads:
        xr = x.clone().requires_grad_()
        set_pool_hpp_ref(xr, seqL, bins, mname).backward(g)
        torch.testing.assert_close(bwd.out["dx"], xr.grad, rtol=1e-6, atol=1e-7)


@needs_c
def test_pooling_shapes_the_old_glue_refused(kernels):
    """Shapes the CUDA glue used to refuse (issue 15): temporal pooling of a 128 x 88 map (no
    shared memory at all), the fused pyramid on a 4096-row map (80 KiB of shared memory: the
    launcher raises the kernel's limit), and 300 packed sequences (three launches, each with
    its sequence starts in the kernel arguments)."""
    cases = []
    b = cuda_emu.Batch()
    x = torch.randn(1, 2, 3, 128, 88)
    out_c, targ_c = torch.ops.qgait.temporal_pool(x, [], True)
    g = torch.randn(out_c.shape)
    f = b.pool_fwd(x, None, (), 0, False, (True, False))
    d = b.pool_bwd(g, targ_c, None, x.shape, None, (), 0, False)
    cases.append(("tp 128x88", x, None, None, out_c, targ_c, None, g, f, d))
    for seqL, shape, bins in ((None, (1, 1, 2, 4096, 2), (16, 1)),
                              ([1 + i % 2 for i in range(300)], (1, 2, 450, 4, 3), (2, 1))):
        x = torch.randn(shape)
        out_c, targ_c, sarg_c = _cpu_sph(x, seqL, bins, 0)
        g = torch.randn(out_c.shape)
        f = b.pool_fwd(x, seqL, bins, 0, True, (True, True))
        d = b.pool_bwd(g, targ_c, sarg_c, shape, seqL, bins, 0, True)
        cases.append((f"sph {shape}", x, seqL, bins, out_c, targ_c, sarg_c, g, f, d))
    b.run(kernels)
    for what, x, seqL, bins, out_c, targ_c, sarg_c, g, f, d in cases:
        assert f.rc == 0 and d.rc == 0, what
        torch.testing.assert_close(f.out["out"], out_c, rtol=1e-6, atol=1e-6)
        assert torch.equal(f.out["targ"], targ_c), what
        if sarg_c is not None:
            assert torch.equal(f.out["sarg"], sarg_c), what
            dx_c = torch.ops.qgait.set_pool_hpp_backward(g, targ_c, sarg_c, list(x.shape),
                                                         list(seqL or []), list(bins), 0)
        else:
            dx_c = torch.ops.qgait.temporal_pool_backward(g, targ_c, list(x.shape), [])
        torch.testing.assert_close(d.out["dx"], dx_c, rtol=1e-6, atol=1e-7)


def test_pooling_cuda_limits_agree_with_the_python_backend(asan):
    """pool_cuda_limit (what the CUDA glue enforces) and qgait.ops.pooling's cuda backend
    reasons (what makes the auto backend fall back) accept and refuse the same shapes."""
    from qgait.ops.pooling import cuda_limit_reasons

    sm80, sm90 = 163 * 1024, 227 * 1024
    cases = [((4, 128, 30, 64, 44), None, (16, 8, 4, 2, 1), True, sm80),
             ((1, 1, 2, 4096, 2), None, (16,), True, sm80),
             ((1, 1, 2, 4096, 16), None, (16,), True, sm80),   # 256 KiB: refused
             ((1, 1, 2, 4096, 16), None, (16,), True, sm90),
             ((1, 1, 2, 4096, 16), None, (), False, sm80),     # temporal: no limit
             ((1, 2, 3, 128, 88), None, (), False, 48 * 1024),
             ((1, 2, 3, 16, 11), None, tuple(range(1, 18)), True, sm80)]  # 17 levels
    b = cuda_emu.Batch()
    rs = [b.pool_limit(shape, seqL, bins, hpp, smem) for shape, seqL, bins, hpp, smem in cases]
    b.run(asan)
    for (shape, seqL, bins, hpp, smem), r in zip(cases, rs):
        c_why = bytes(r.out["why"].tolist()).split(b"\0")[0].decode()
        py_why = cuda_limit_reasons(shape, len(seqL or []), hpp, len(bins), smem)
        assert bool(c_why) == bool(py_why), f"{shape} hpp={hpp}: C++ {c_why!r}, Python {py_why}"
    assert cuda_limit_reasons((1, 1, 2, 4096, 16), 0, True, 1, sm80)  # the refusals are real
    assert cuda_limit_reasons((1, 1, 2, 16, 11), 0, True, 17, sm80)


def test_pooling_auto_backend_falls_back_on_a_shape_limit():
    """When the first backend states a reason (here the CUDA kernels' shared-memory limit),
    auto selection takes the next one instead of raising; a forced backend still raises."""
    from qgait import _backend
    from qgait.ops import pooling as P

    x = torch.randn(1, 1, 2, 4096, 16)
    cuda_like = _backend.Backend(
        "cuda",
        lambda x, hpp, bins, n: P.cuda_limit_reasons(x.shape, n, hpp, len(bins), 163 * 1024),
        "cuda-run")
    ref = _backend.Backend("reference", lambda *a: [], "ref-run")
    assert _backend.select("set_pool_hpp", (cuda_like, ref), "auto", False, x, True, (16,), 0) \
        is ref
    with pytest.raises(RuntimeError, match="shared memory"):
        _backend.select("set_pool_hpp", (cuda_like, ref), "cuda", False, x, True, (16,), 0)
    assert _backend.select("temporal_pool", (cuda_like, ref), "auto", False, x, False, (), 0) \
        is cuda_like


_INDEX_DEVICE_CHECK = r"""
#include <iostream>

#include "pooling.h"

// check_pool_backward (csrc/pooling.h) is what every backward's glue, CUDA's included, runs
// first. The CUDA glue cannot be built here (torch has no CUDA), and the dispatcher would send
// a call with a meta index tensor to the fake kernel, so the check is exercised directly.
int main() {
  const at::Tensor g3 = at::randn({1, 2, 3}), g4 = at::randn({1, 2, 3, 4});
  const auto cpu_i = at::TensorOptions().dtype(at::kInt);
  const auto meta_i = cpu_i.device(at::kMeta);
  auto run = [](const char* what, auto&& f) {
    try {
      f();
      std::cout << what << ": accepted\n";
    } catch (const c10::Error& e) {
      std::cout << what << ": refused: " << e.what_without_backtrace() << "\n";
    }
  };
  run("tp cpu", [&] { qgait::check_pool_backward("temporal_pool_backward", false, g4,
                        at::zeros({1, 2, 3, 4}, cpu_i), nullptr, {1, 2, 2, 3, 4}, {}, {},
                        qgait::kMax); });
  run("tp meta targ", [&] { qgait::check_pool_backward("temporal_pool_backward", false, g4,
                              at::zeros({1, 2, 3, 4}, meta_i), nullptr, {1, 2, 2, 3, 4}, {}, {},
                              qgait::kMax); });
  const at::Tensor sarg_meta = at::zeros({1, 2, 3}, meta_i), sarg_cpu = at::zeros({1, 2, 3}, cpu_i);
  run("sph meta sarg", [&] { qgait::check_pool_backward("set_pool_hpp_backward", true, g3,
                               at::zeros({1, 2, 3, 4}, cpu_i), &sarg_meta, {1, 2, 2, 3, 4}, {},
                               {3}, qgait::kMeanMax); });
  run("sph cpu", [&] { qgait::check_pool_backward("set_pool_hpp_backward", true, g3,
                         at::zeros({1, 2, 3, 4}, cpu_i), &sarg_cpu, {1, 2, 2, 3, 4}, {}, {3},
                         qgait::kMeanMax); });
  // T = 1 and mode "mean" use no indices: an empty tensor anywhere is fine
  run("tp T=1", [&] { qgait::check_pool_backward("temporal_pool_backward", false, g4,
                        at::empty({0}, meta_i), nullptr, {1, 2, 1, 3, 4}, {}, {},
                        qgait::kMax); });
}
"""


@pytest.mark.slow
def test_pool_backward_checks_index_devices(tmp_path):
    """The backward refuses arg-max indices on another device than grad (a kernel would read
    a host pointer on the GPU); ~30 s: one compile against torch's headers."""
    import subprocess

    from torch.utils.cpp_extension import include_paths, library_paths

    (tmp_path / "t.cpp").write_text(_INDEX_DEVICE_CHECK)
    cmd = [cuda_emu.compiler(), "-std=c++17", "-O0", "-w", *[f"-I{p}" for p in include_paths()],
           f"-I{cuda_emu.CSRC}", str(tmp_path / "t.cpp"), "-o", str(tmp_path / "t"),
           *[f"-L{p}" for p in library_paths()],
           *[f"-Wl,-rpath,{p}" for p in library_paths()], "-ltorch_cpu", "-lc10"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    out = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert lines["tp cpu"] == "accepted" and lines["sph cpu"] == "accepted"
    assert lines["tp T=1"] == "accepted"
    assert lines["tp meta targ"].startswith(
        "refused: qgait::temporal_pool_backward: targ is on meta")
    assert lines["sph meta sarg"].startswith(
        "refused: qgait::set_pool_hpp_backward: sarg is on meta")


# =============================================================================================
# Packed conv3d: input packing (float / int8 / uint8 / bool, any strides), implicit GEMM with
# int8 and int4 weights, every epilogue, requantization; exact against the reference.
# =============================================================================================
# (N, C_in, C_out, (T, H, W), kernel, stride, padding, dilation)
CONV_CASES = [
    (1, 3, 5, (3, 5, 6), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    (1, 1, 16, (2, 6, 5), (1, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),     # C_in = 1
    (2, 7, 17, (5, 4, 4), (3, 1, 1), (2, 2, 2), (0, 0, 0), (1, 1, 1)),     # odd, stride 2
    (1, 40, 70, (2, 3, 4), (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 1, 2)),    # 2 K-blocks, 2 N-tiles
    (1, 9, 8, (1, 9, 9), (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1)),      # pointwise, M > 64
]


def _conv_input(case, kind, g):
    n, ci, co, (t, h, w), *_ = case
    if kind == "float_u":
        x = (torch.randn(n, ci, t, h, w, generator=g) * 3).abs()
        x.view(-1)[::13] = float("nan")  # NaN has no code: in_qn
        return x, torch.tensor(0.021), 0, 255
    if kind == "float_s":
        x = torch.randn(n, ci, t, h, w, generator=g) * 3
        x.view(-1)[5::17] = torch.arange(-3, 4).repeat(100)[: x.view(-1)[5::17].numel()] * 0.0105
        return x, torch.tensor(0.021), -128, 127
    if kind == "int8":
        return (torch.randint(-128, 128, (n, ci, t, h, w), generator=g).to(torch.int8),
                torch.tensor(0.5), -128, 127)
    if kind == "uint8_cl":  # channels-last strides
        x = torch.randint(0, 256, (n, ci, t, h, w), generator=g).to(torch.uint8)
        return x.contiguous(memory_format=torch.channels_last_3d), torch.tensor(0.5), 0, 255
    return torch.rand(n, ci, t, h, w, generator=g) < 0.5, torch.tensor(1.0), 0, 1


# (input kind, w_bits, out_mode, act, bias, bn, out grid)
CONV_VARIANTS = [
    ("float_u", 8, 2, 0, False, False, None),
    ("float_s", 4, 0, 1, True, False, None),
    ("int8", 8, 0, 2, True, True, None),
    ("uint8_cl", 4, 1, 1, False, True, (0, 255)),
    ("bool", 8, 1, 2, True, False, (-128, 127)),
    ("float_s", 8, 1, 0, True, True, (-8, 7)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"c{c[1]}o{c[2]}k{''.join(map(str, c[4]))}"
                                                  for c in CONV_CASES])
def test_packed_conv3d_exact(kernels, case):
    n, ci, co, thw, k, s, p, d = case
    b = cuda_emu.Batch()
    runs = []
    for vi, (kind, w_bits, out_mode, act, with_bias, with_bn, out_grid) in enumerate(CONV_VARIANTS):
        g = torch.Generator().manual_seed(vi)
        x, xs, in_qn, in_qp = _conv_input(case, kind, g)
        lo, hi = (-128, 127) if w_bits == 8 else (-8, 7)
        w_int = torch.randint(lo, hi + 1, (co, ci, *k), generator=g)
        wp = pack_weight(w_int, w_bits)
        ws = torch.rand(co, generator=g) * 0.02 + 1e-3
        bias = torch.randn(co, generator=g) if with_bias else None
        bn_s = torch.rand(co, generator=g) + 0.5 if with_bn else None
        bn_b = torch.randn(co, generator=g) * 0.1 if with_bn else None
        out_scale = torch.tensor(0.05) if out_mode == 1 else None
        oqn, oqp = out_grid or (0, 0)
        args = (x, xs, in_qn, in_qp, wp, ws, w_bits, ci, s, p, d, bias, bn_s, bn_b, act, 0.1,
                out_mode, out_scale, oqn, oqp)
        runs.append((kind, w_bits, out_mode, args, b.conv(*args)))
    b.run(kernels)
    for kind, w_bits, out_mode, args, r in runs:
        what = f"{kind} w{w_bits} out_mode={out_mode}"
        assert r.rc == 0, what
        x = args[0]
        if x.is_floating_point():  # NaN has no code: the kernels take in_qn (0 here)
            assert args[2] == 0 or not torch.isnan(x).any()
            x = torch.nan_to_num(x.contiguous(), nan=0.0)
        ref = packed_conv3d_ref(x, *args[1:])
        got = r.out["y"].permute(0, 4, 1, 2, 3)  # the kernel writes [N, T', H', W', C_out]
        if out_mode == 0:
            _bits_equal(got, ref, what)
        else:
            assert torch.equal(got, ref), what


def test_packed_conv3d_production_grid(kernels_full):
    case = CONV_CASES[3]
    n, ci, co, thw, k, s, p, d = case
    g = torch.Generator().manual_seed(1)
    x, xs, in_qn, in_qp = _conv_input(case, "float_s", g)
    wp = pack_weight(torch.randint(-8, 8, (co, ci, *k), generator=g), 4)
    ws = torch.rand(co, generator=g) * 0.02 + 1e-3
    args = (x, xs, in_qn, in_qp, wp, ws, 4, ci, s, p, d, None, None, None, 0, 0.0, 2, None, 0, 0)
    b = cuda_emu.Batch()
    r = b.conv(*args)
    b.run(kernels_full)
    assert r.rc == 0
    assert torch.equal(r.out["y"].permute(0, 4, 1, 2, 3), packed_conv3d_ref(*args))


def test_packed_conv3d_narrow_channels_scratch():
    """A 1-channel stem no longer pads C_in to 32: the scratch of [64, 1, 30, 64, 44] with a
    3x3x3 kernel is the padded input, 1 byte per voxel (6.2 MB, was 199 MB), and its K loop
    runs ceil(27 / 32) = 1 step instead of 27. Wide layers keep the 32-channel blocks."""
    b = cuda_emu.Batch()
    stem = b.conv_scratch((64, 1, 30, 64, 44), 1, (64, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    wide = b.conv_scratch((2, 40, 5, 8, 6), 40, (8, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    b.run(_build("asan"))
    assert int(stem.out["bytes"]) == 64 * 32 * 66 * 46
    assert int(wide.out["bytes"]) == 2 * 7 * 10 * 8 * 64


@pytest.mark.parametrize("bad", ["x_scale", "w_scale", "out_scale"])
def test_packed_conv3d_bad_scale_asserts_once(asan, bad):
    """Scales are checked on the device as the CPU backend checks them (finite, > 0): one
    report, one device-side assert, cudaErrorAssert."""
    case = CONV_CASES[2]
    n, ci, co, thw, k, s, p, d = case
    g = torch.Generator().manual_seed(0)
    x, xs, in_qn, in_qp = _conv_input(case, "int8", g)
    wp = pack_weight(torch.randint(-128, 128, (co, ci, *k), generator=g), 8)
    ws = torch.rand(co, generator=g) * 0.02 + 1e-3
    out_scale = torch.tensor(0.05)
    if bad == "x_scale":
        xs = torch.tensor(float("nan"))
    elif bad == "w_scale":
        ws[5] = 0.0
    else:
        out_scale = torch.tensor(-1.0)
    b = cuda_emu.Batch()
    r = b.conv(x, xs, in_qn, in_qp, wp, ws, 8, ci, s, p, d, None, None, None, 0, 0.0,
               1 if bad == "out_scale" else 2, out_scale, -128, 127)
    proc = b.run(asan)
    assert r.rc == 710
    reports = re.findall(r"qgait::packed_conv3d: (\w+)\[(\d+)\] = (\S+);", proc.stdout)
    assert len(reports) == 1 and reports[0][0] == bad, proc.stdout[-2000:]
    if bad == "w_scale":
        assert reports[0][1:] == ("5", "0")
    assert proc.stderr.count("Assertion") == 1


# =============================================================================================
# The harness itself: launch limits fail as CUDA does.
# =============================================================================================
def test_emulated_16bit_conversions(asan):
    """The emulation's half / bfloat16 conversions against torch's (round to nearest even):
    every 16-bit pattern back to fp32 exactly, and fp32 values around every rounding boundary,
    the subnormal range, overflow and the specials to 16 bits; a NaN becomes the device's
    canonical NaN 0x7FFF (torch keeps the payload, so only NaN-ness is compared)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    g = torch.Generator().manual_seed(0)
    mid = (torch.arange(-32768, 32768, dtype=torch.int32) << 16)  # bf16 patterns as fp32 bits
    f = torch.cat([
        torch.randn(20000, generator=g) * 1000,
        torch.randn(20000, generator=g) * 1e-6,                  # half subnormals
        torch.rand(2000, generator=g) * 7e4,                     # half overflow boundary
        bits.view(torch.float16).float(),                        # every half value
        (mid + 0x8000).view(torch.float32),                      # bf16 ties
        (mid + 0x7FFF).view(torch.float32), (mid + 0x8001).view(torch.float32),
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99,
                      65520.0, 2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -24 * 1.5, 1e-45]),
    ])
    half_mid = bits.view(torch.float16).float()
    f = torch.cat([f, (half_mid[:-1] + half_mid[1:]) / 2])  # half ties (exact in fp32)
    b = cuda_emu.Batch()
    r = b.cvt16(f, bits)
    b.run(asan)
    for out, dt in ((r.out["half"], torch.float16), (r.out["bf16"], torch.bfloat16)):
        want = f.to(dt)
        got = out.view(dt)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert bool((out[nan] == 0x7FFF).all())
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), dt
    for out, dt in ((r.out["from_half"], torch.float16), (r.out["from_bf16"], torch.bfloat16)):
        want = bits.view(dt).float()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32)), dt


def test_launch_limits_fail_like_cuda(asan):
    """The harness refuses what CUDA refuses: a pooling map whose shared-memory needs exceed
    the device's opt-in maximum gets cudaErrorInvalidValue (1) and leaves the outputs
    untouched; the same map with W halved fits once the kernel raises its limit."""
    b = cuda_emu.Batch()
    big = b.pool_fwd(torch.randn(1, 1, 2, 256, 200), None, (1,), 0, True, (False, False))
    fits = b.pool_fwd(torch.randn(1, 1, 2, 256, 100), None, (1,), 0, True, (False, False))
    b.run(asan)
    assert big.rc == 1 and torch.isnan(big.out["out"]).all()
    assert fits.rc == 0 and not torch.isnan(fits.out["out"]).any()


# =============================================================================================
# Mutation tests: a broken kernel must fail here.
# =============================================================================================
def _mutate(rel: str, old: str, new: str, count: int = 1) -> dict[str, str]:
    text = (cuda_emu.CSRC / rel).read_text()
    assert text.count(old) >= count, f"mutation anchor not found in {rel}: {old!r}"
    return {rel: text.replace(old, new, count)}


def test_mutation_oversized_block_fails_like_cuda():
    """Pooling launched with 2048 threads per block: CUDA refuses the launch (invalid
    configuration, 9) before any thread runs; so does the emulation, and the bind would raise."""
    exe = _build("asan", _mutate("cuda/pooling.cu", "constexpr int kThreads = 256;",
                                 "constexpr int kThreads = 2048;"))
    b = cuda_emu.Batch()
    r = b.pool_fwd(torch.randn(1, 2, 3, 8, 4), None, (4, 1), 0, True, (True, True))
    b.run(exe)
    assert r.rc == 9 and torch.isnan(r.out["out"]).all()


def test_mutation_tail_check_is_caught():
    """The forward's tail check `i < n` turned into `i <= n`: an out-of-bounds read of x and
    write of y, which ASan reports (the intact kernel passes the same request)."""
    exe = _build("asan", _mutate("cuda/soft_fake_quant.cu", "if (VEC > 1 && i < n)",
                                 "if (VEC > 1 && i <= n)"))
    x = torch.randn(37)
    for build, fails in ((exe, True), (_build("asan"), False)):
        b = cuda_emu.Batch()
        r = b.sfq_fwd(x, torch.tensor([0.1]), 1, 1, 37, _consts(-128, 127, 0.0, False))
        if fails:
            with pytest.raises(cuda_emu.EmuFailure, match="AddressSanitizer: heap-buffer-overflow"):
                b.run(build)
        else:
            b.run(build)
            assert r.rc == 0
            _bits_equal(r.out["y"], torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127),
                        "y")


def test_mutation_missing_barrier_is_caught():
    """The backward's barrier between writing the per-row constants (rowc) and reading them
    removed: the fibers of a block run in a fixed pseudo-random order, so some thread reads a
    row that a later-scheduled thread has not written yet: garbage (NaN) reaches dx."""
    src = "cuda/pooling.cu"
    anchor = "      rowc[h] = acc;\n    }\n    __syncthreads();\n"
    exe = _build("asan", _mutate(src, anchor, "      rowc[h] = acc;\n    }\n"))
    shape, bins = (1, 2, 2, 64, 4), (16, 4, 1)
    x = torch.randn(shape)
    N, C, T, H, W = shape
    out_c, targ_c, sarg_c = _cpu_sph(x, None, bins, 0)
    g = torch.randn(N, C, sum(bins))
    dx_c = torch.ops.qgait.set_pool_hpp_backward(g, targ_c, sarg_c, list(shape), [], list(bins), 0)
    b = cuda_emu.Batch()
    r = b.pool_bwd(g, targ_c, sarg_c, shape, None, bins, 0, True)
    b.run(exe)
    assert not torch.allclose(r.out["dx"], dx_c, rtol=1e-6, atol=1e-7), \
        "a kernel without its barrier passed the comparison"
    # the intact kernel passes the same comparison
    b = cuda_emu.Batch()
    r = b.pool_bwd(g, targ_c, sarg_c, shape, None, bins, 0, True)
    b.run(_build("asan"))
    torch.testing.assert_close(r.out["dx"], dx_c, rtol=1e-6, atol=1e-7)


# =============================================================================================
# ThreadSanitizer (-m tsan): races between the CUDA threads of a block are races between host
# threads here. One case per kernel family, then a removed barrier that TSan must report.
# =============================================================================================
@pytest.mark.tsan
def test_tsan_every_kernel(tsan):
    b = cuda_emu.Batch()
    checks = []
    for shape, axis in [((3, 5, 37), -1), ((2, 3, 200), 1), ((2, 3, 201), 1), ((70, 3, 3), 1)]:
        x, gy, scale = _sfq_inputs(shape, axis, -8, 7, torch.float32, seed=1)
        outer, C, inner = _layout(shape, axis)
        P = _consts(-8, 7, 4.0, True)
        b.sfq_fwd(x, scale, outer, C, inner, P)
        b.sfq_bwd(gy, x, scale, outer, C, inner, P, 0.5)
    shape, seqL, bins = (1, 2, 5, 16, 3), [2, 3], (16, 4, 1)
    x = torch.randn(shape)
    N, C, T, H, W = shape
    NO, B = len(seqL), sum(bins)
    fwd = b.pool_fwd(x, seqL, bins, 0, True, (True, True))
    out_c, targ_c, sarg_c = _cpu_sph(x, seqL, bins, 0) if _ext.HAS_C else (None,) * 3
    g = torch.randn(NO, C, B)
    if targ_c is not None:
        bwd = b.pool_bwd(g, targ_c, sarg_c, shape, seqL, bins, 0, True)
        checks.append(lambda: torch.testing.assert_close(
            bwd.out["dx"], torch.ops.qgait.set_pool_hpp_backward(
                g, targ_c, sarg_c, list(shape), seqL, list(bins), 0), rtol=1e-6, atol=1e-7))
    convs = []
    for case, kind in ((CONV_CASES[3], "float_s"), (CONV_CASES[1], "uint8_cl")):  # wide, narrow
        gen = torch.Generator().manual_seed(0)
        xc, xs, in_qn, in_qp = _conv_input(case, kind, gen)
        n, ci, co, thw, k, s, p, d = case
        wp = pack_weight(torch.randint(-128, 128, (co, ci, *k), generator=gen), 8)
        args = (xc, xs, in_qn, in_qp, wp, torch.rand(co, generator=gen) * 0.01 + 1e-3, 8, ci, s,
                p, d, None, None, None, 0, 0.0, 2, None, 0, 0)
        convs.append((args, b.conv(*args)))
    b.run(tsan)
    set_pool_hpp_ref(x, seqL, bins)  # the reference runs too
    torch.testing.assert_close(fwd.out["out"], set_pool_hpp_ref(x, seqL, bins), rtol=1e-5,
                               atol=1e-5)
    for args, conv in convs:
        assert torch.equal(conv.out["y"].permute(0, 4, 1, 2, 3),
                           packed_conv3d_ref(args[0].contiguous(), *args[1:]))
    for c in checks:
        c()


@pytest.mark.tsan
def test_tsan_catches_missing_barrier(tsan):
    """block_sum without the barrier between the warps' partial sums and their reduction: the
    first warp reads warp_sums while other warps write them, a data race TSan reports."""
    exe = _build("tsan", _mutate("cuda/soft_fake_quant.cu",
                                 "  if ((tid & 31) == 0) warp_sums[tid >> 5] = v;\n"
                                 "  __syncthreads();",
                                 "  if ((tid & 31) == 0) warp_sums[tid >> 5] = v;"))
    # inner = 201: the scalar rows kernel, 64 threads (two warps) per 64-element segment
    x, gy, scale = _sfq_inputs((2, 3, 201), 1, -8, 7, torch.float32, seed=1)
    b = cuda_emu.Batch()
    b.sfq_bwd(gy, x, scale, 2, 3, 201, _consts(-8, 7, 4.0, True), 0.5)
    with pytest.raises(cuda_emu.EmuFailure, match="ThreadSanitizer: data race"):
        b.run(exe)

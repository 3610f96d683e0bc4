"""Triton kernels of the soft fake-quantizer (the math is in qgait/ops/soft_quant.py).

Written to run under TRITON_INTERPRET=1 as well as on GPUs: no libdevice calls. tanh is built
from exp (Cephes' split: an odd polynomial near 0, the exp form elsewhere), round-half-to-even
from the fp32 magic-number trick, floor from that rounding. The reciprocal ``r = 1/s`` is
computed in the kernels with IEEE division (``tl.div_rn``; ``/`` lowers to the approximate
``div.full.f32`` on GPUs, and so does a ``1 / s`` that Inductor compiles in a traced launcher),
so hard results are bit-exact with torch's fake-quant ops.

Both kernels view x as ``[rows, inner]`` (per channel: ``rows = outer * C``, the channel of a
row is ``row % C``; per tensor: one row of ``numel`` elements) and give each program a
``[BR, BI]`` tile of it, ``BR * BI <= BLOCK``, shaped from the layout: ``inner = 27`` takes
32 x 32 tiles (84% of the lanes busy, not 3% as one 1024-wide block per row), the last axis
(``inner = 1``) 1024 rows at once. Index arithmetic is int64: a tensor may hold 2^31 elements
or more. The step gradient is reduced deterministically: each program writes one partial per
row of its tile and torch sums them in order.

A step that is not finite and > 0 fails a device-side assert (``tl.device_assert``): the
launchers compile the kernels with ``debug=True`` (and without Triton's integer-overflow
asserts); Inductor compiles user kernels with ``debug`` on by default.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program
# 1.5 * 2^23: for |c| < 2^22, (c + M) - M is c rounded half-to-even in fp32 arithmetic.
_RINT_MAGIC = 12582912.0
# Launch options of every qgait Triton kernel in eager mode: device asserts on, Triton's
# int32-overflow asserts off (they would tax every index operation; ours are int64).
DEBUG_OPTS = {"debug": True, "sanitize_overflow": False}


def launch_opts():
    """Extra launch keywords: none while torch.compile traces (Inductor picks the compile
    options of user kernels itself, with device asserts on)."""
    return {} if torch.compiler.is_compiling() else dict(DEBUG_OPTS)


@triton.jit
def _rint(c):
    return (c + 12582912.0) - 12582912.0


@triton.jit
def _tanh(z):
    a = tl.abs(z)
    s = z * z
    p = -5.70498872745e-3 * s + 2.06390887954e-2
    p = p * s - 5.37397155531e-2
    p = p * s + 1.33314422036e-1
    p = p * s - 3.33332819422e-1
    small = z + z * s * p
    # clamp that keeps NaN: a GPU's tl.minimum is fminf, which would return 88 for a NaN and
    # turn tanh(NaN) into 1 (and the surrogate gradient into 0)
    e = tl.exp(tl.where(a + a > 88.0, 88.0, a + a))
    big = 1.0 - tl.div_rn(2.0, e + 1.0)  # no approximate division (``/`` on a GPU)
    big = tl.where(z < 0, -big, big)
    return tl.where(a < 0.625, small, big)


@triton.jit
def _bf16_rne(v):
    """fp32 -> bf16 rounding to nearest even on the bits (the interpreter truncates in its own
    conversion), as torch's conversion: a carry into the exponent rounds up to inf. A NaN
    becomes the quiet NaN 0x7FC0: the GPU's canonical NaN 0x7FFFFFFF would otherwise carry
    into the sign (-0.0), and a signalling NaN 0x7F800001 round to inf."""
    u = v.to(tl.uint32, bitcast=True)
    nan = v != v
    u = tl.where(nan, 0, u)  # finite and inf: no carry out of 32 bits
    h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    h = tl.where(nan, 0x7FC0, h)
    return h.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _cast_out(v, ptr):
    # Narrow to the output dtype rounding to nearest even, as torch's .to() does.
    if ptr.dtype.element_ty == tl.float32:
        return v
    elif ptr.dtype.element_ty == tl.bfloat16:
        return _bf16_rne(v)
    else:
        return v.to(ptr.dtype.element_ty)


@triton.jit
def _tile(pid, nb, rows, inner, BR: tl.constexpr, BI: tl.constexpr):
    """Program ``pid``'s tile of x viewed as [rows, inner], ``nb`` tiles per row block:
    rows [BR], columns [BI], int64 element offsets [BR, BI] and the mask. pid is int32 (a
    program id): widened before any product, so offsets past 2^31 stay exact."""
    rb = pid // nb
    cb = pid % nb
    row = rb.to(tl.int64) * BR + tl.arange(0, BR)
    col = cb.to(tl.int64) * BI + tl.arange(0, BI)
    offs = row[:, None] * inner + col[None, :]
    mask = (row[:, None] < rows) & (col[None, :] < inner)
    return row, col, offs, mask


@triton.jit
def _step(s_ptr, row, rows, C):
    """The step of each row and its IEEE reciprocal; asserts (debug builds) s finite > 0."""
    s = tl.load(s_ptr + row % C, mask=row < rows, other=1.0)
    tl.device_assert((s > 0.0) & (s < float("inf")),
                     "qgait::soft_fake_quant: scale must be finite and > 0")
    return s, tl.div_rn(1.0, s)


@triton.jit
def _quant(x, r, qn, qp, k, tanh_scale, g_scale, SOFT: tl.constexpr, K0: tl.constexpr):
    """Returns (v, c, g, q) of the math for fp32 x and reciprocal step r."""
    v = x * r
    # clamp that keeps NaN (comparisons with NaN are false)
    c = tl.where(v < qn, qn, tl.where(v > qp, qp, v))
    rc = _rint(c)
    if K0:
        g = tl.full(c.shape, 1.0, tl.float32)
        if SOFT:
            q = c
        else:
            q = rc
    else:
        fl = tl.where(rc > c, rc - 1.0, rc)  # floor(c)
        t = _tanh(k * (c - fl - 0.5))
        g = g_scale * (1.0 - t * t)
        if SOFT:
            q = fl + 0.5 + t * tanh_scale
        else:
            q = rc
    return v, c, g, q


@triton.jit
def _sfq_fwd_kernel(x_ptr, y_ptr, s_ptr, rows, inner, C, nb, qn, qp, k, tanh_scale, g_scale,
                    SOFT: tl.constexpr, K0: tl.constexpr, BR: tl.constexpr, BI: tl.constexpr):
    pid = tl.program_id(0)
    row, col, offs, mask = _tile(pid, nb, rows, inner, BR, BI)
    s, r = _step(s_ptr, row, rows, C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v, c, g, q = _quant(x, r[:, None], qn, qp, k, tanh_scale, g_scale, SOFT, K0)
    # + 0.0: -0 -> +0, bit-identical to torch ((round(v) + zp) - zp)
    tl.store(y_ptr + offs, _cast_out(q * s[:, None] + 0.0, y_ptr), mask=mask)


@triton.jit
def _sfq_bwd_kernel(gy_ptr, x_ptr, dx_ptr, part_ptr, s_ptr, rows, inner, C, nb, qn, qp, k,
                    tanh_scale, g_scale, SOFT: tl.constexpr, K0: tl.constexpr,
                    NEED_DX: tl.constexpr, NEED_DS: tl.constexpr, BR: tl.constexpr,
                    BI: tl.constexpr):
    pid = tl.program_id(0)
    row, col, offs, mask = _tile(pid, nb, rows, inner, BR, BI)
    s, r = _step(s_ptr, row, rows, C)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v, c, g, q = _quant(x, r[:, None], qn, qp, k, tanh_scale, g_scale, SOFT, K0)
    below = v < qn
    above = v > qp
    if NEED_DX:
        dx = tl.where(below | above, 0.0, gy * g)
        tl.store(dx_ptr + offs, _cast_out(dx, dx_ptr), mask=mask)
    if NEED_DS:
        term = gy * tl.where(below, qn, tl.where(above, qp, q - v * g))
        term = tl.where(mask, term, 0.0)
        # partial of (row, column block): part is [rows, nb]
        tl.store(part_ptr + row * nb + pid % nb, tl.sum(term, axis=1), mask=row < rows)


def _consts(k):
    from qgait.ops.soft_quant import _tanh_consts

    return (0.0, 1.0) if k == 0.0 else _tanh_consts(k)


def _layout(x, axis):
    """(outer, C, inner) of x around the step's axis (per tensor: one channel, one row)."""
    if axis < 0:
        return 1, 1, x.numel()
    outer = 1
    for d in range(axis):
        outer *= x.shape[d]
    return outer, x.shape[axis], x.numel() // max(1, outer * x.shape[axis])


def tile_shape(rows, inner):
    """(BR, BI): the [rows, columns] tile of one program, BR * BI <= BLOCK, powers of two."""
    bi = min(triton.next_power_of_2(max(inner, 1)), BLOCK)
    br = min(BLOCK // bi, triton.next_power_of_2(max(rows, 1)))
    return br, bi


def _grid(rows, inner):
    br, bi = tile_shape(rows, inner)
    nb = triton.cdiv(inner, bi)
    return br, bi, nb, triton.cdiv(rows, br) * nb


def forward(x, scale, axis, qn, qp, k, soft):
    from torch.library import wrap_triton

    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    s = scale.reshape(-1).contiguous()
    outer, C, inner = _layout(x, axis)
    rows = outer * C
    br, bi, nb, n_prog = _grid(rows, inner)
    tanh_scale, g_scale = _consts(k)
    wrap_triton(_sfq_fwd_kernel)[(n_prog,)](
        x, y, s, rows, inner, C, nb, float(qn), float(qp), float(k), tanh_scale, g_scale,
        SOFT=bool(soft), K0=(k == 0.0), BR=br, BI=bi, **launch_opts())
    return y


def partials_buffer(x, outer, C, nb, need_ds):
    """The backward kernel's per-(row, column block) partial sums of ds: [outer, C, nb] (row
    = o * C + c), allocated in that shape. A flat [rows * nb] buffer viewed as [outer, C, nb]
    made torch.compile / AOT tracing with symbolic shapes prove rows * nb == outer * C * nb
    through next_power_of_2's bit tricks, which sent sympy into minutes of simplification
    (seen as a 120 s timeout of opcheck on an H200)."""
    shape = (outer, C, nb) if need_ds else (1,)
    return torch.empty(shape, device=x.device, dtype=torch.float32)


def backward(grad_y, x, scale, axis, qn, qp, k, soft, gamma, need_dx, need_ds):
    from torch.library import wrap_triton

    x = x.contiguous()
    grad_y = grad_y.contiguous()
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    n = x.numel()
    outer, C, inner = _layout(x, axis)
    s = scale.reshape(-1).contiguous()
    if n == 0 or not (need_dx or need_ds):
        ds = torch.zeros_like(scale) if need_ds else scale.new_empty(0)
        return dx, ds
    rows = outer * C
    br, bi, nb, n_prog = _grid(rows, inner)
    part = partials_buffer(x, outer, C, nb, need_ds)
    tanh_scale, g_scale = _consts(k)
    wrap_triton(_sfq_bwd_kernel)[(n_prog,)](
        grad_y, x, dx if need_dx else x, part, s, rows, inner, C, nb, float(qn), float(qp),
        float(k), tanh_scale, g_scale, SOFT=bool(soft), K0=(k == 0.0), NEED_DX=bool(need_dx),
        NEED_DS=bool(need_ds), BR=br, BI=bi, **launch_opts())
    if need_ds:
        ds = (part.sum(dim=(0, 2)) * gamma).reshape(scale.shape)
    else:
        ds = scale.new_empty(0)
    return dx, ds

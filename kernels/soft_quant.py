"""Triton kernels of the soft fake-quantizer (the math is in qgait/ops/soft_quant.py).

Written to run under TRITON_INTERPRET=1 as well as on GPUs: no libdevice calls. tanh is built
from exp (Cephes' split: an odd polynomial near 0, the exp form elsewhere), round-half-to-even
from the fp32 magic-number trick, floor from that rounding. The reciprocal ``r = 1/s`` is
computed by torch (IEEE division) so hard results are bit-exact with torch's fake-quant ops.

The step gradient is reduced deterministically: the grid is (row, block) over x viewed as
[rows = outer*C, inner]; each program writes its own partial and torch sums them in order.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
# 1.5 * 2^23: for |c| < 2^22, (c + M) - M is c rounded half-to-even in fp32 arithmetic.
_RINT_MAGIC = 12582912.0


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
    e = tl.exp(tl.minimum(a + a, 88.0))
    big = 1.0 - 2.0 / (e + 1.0)
    big = tl.where(z < 0, -big, big)
    return tl.where(a < 0.625, small, big)


@triton.jit
def _cast_out(v, ptr):
    # Narrow to the output dtype rounding to nearest even, as torch's .to() does. bf16 is
    # rounded by hand on the fp32 bits (the interpreter truncates in its own conversion);
    # the rounded value then converts exactly.
    if ptr.dtype.element_ty == tl.float32:
        return v
    elif ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return v.to(ptr.dtype.element_ty)


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
def _sfq_fwd_kernel(x_ptr, y_ptr, s_ptr, r_ptr, N, C, inner, qn, qp, k, tanh_scale, g_scale,
                    PER_CHANNEL: tl.constexpr, SOFT: tl.constexpr, K0: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        ch = (offs // inner) % C
        s = tl.load(s_ptr + ch, mask=mask, other=1.0)
        r = tl.load(r_ptr + ch, mask=mask, other=1.0)
    else:
        s = tl.load(s_ptr)
        r = tl.load(r_ptr)
    v, c, g, q = _quant(x, r, qn, qp, k, tanh_scale, g_scale, SOFT, K0)
    # + 0.0: -0 -> +0, bit-identical to torch ((round(v) + zp) - zp)
    tl.store(y_ptr + offs, _cast_out(q * s + 0.0, y_ptr), mask=mask)


@triton.jit
def _sfq_bwd_kernel(gy_ptr, x_ptr, dx_ptr, part_ptr, s_ptr, r_ptr, C, inner, nb, qn, qp, k,
                    tanh_scale, g_scale, SOFT: tl.constexpr, K0: tl.constexpr,
                    NEED_DX: tl.constexpr, NEED_DS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // nb  # (o, c) row of x viewed as [outer*C, inner]
    blk = pid % nb
    cidx = row % C
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    offs = row.to(tl.int64) * inner + cols
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + cidx)
    v, c, g, q = _quant(x, r, qn, qp, k, tanh_scale, g_scale, SOFT, K0)
    below = v < qn
    above = v > qp
    if NEED_DX:
        dx = tl.where(below | above, 0.0, gy * g)
        tl.store(dx_ptr + offs, _cast_out(dx, dx_ptr), mask=mask)
    if NEED_DS:
        term = gy * tl.where(below, qn, tl.where(above, qp, q - v * g))
        term = tl.where(mask, term, 0.0)
        tl.store(part_ptr + pid, tl.sum(term, axis=0))


def _consts(k):
    from qgait.ops.soft_quant import _tanh_consts

    return (0.0, 1.0) if k == 0.0 else _tanh_consts(k)


def _layout(x, axis):
    if axis < 0:
        return 1, 1, x.numel()
    outer = 1
    for d in range(axis):
        outer *= x.shape[d]
    return outer, x.shape[axis], x.numel() // max(1, outer * x.shape[axis])


def forward(x, scale, axis, qn, qp, k, soft):
    from torch.library import wrap_triton

    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    s = scale.reshape(-1).contiguous()
    r = 1.0 / s
    outer, C, inner = _layout(x, axis)
    tanh_scale, g_scale = _consts(k)
    grid = (triton.cdiv(n, BLOCK),)
    wrap_triton(_sfq_fwd_kernel)[grid](
        x, y, s, r, n, C, inner, float(qn), float(qp), float(k), tanh_scale, g_scale,
        PER_CHANNEL=axis >= 0, SOFT=bool(soft), K0=(k == 0.0), BLOCK=BLOCK)
    return y


def backward(grad_y, x, scale, axis, qn, qp, k, soft, gamma, need_dx, need_ds):
    from torch.library import wrap_triton

    x = x.contiguous()
    grad_y = grad_y.contiguous()
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    n = x.numel()
    outer, C, inner = _layout(x, axis)
    s = scale.reshape(-1).contiguous()
    r = 1.0 / s
    if n == 0 or not (need_dx or need_ds):
        ds = torch.zeros_like(scale) if need_ds else scale.new_empty(0)
        return dx, ds
    nb = triton.cdiv(inner, BLOCK)
    rows = outer * C
    part = torch.empty(rows * nb, device=x.device, dtype=torch.float32)
    tanh_scale, g_scale = _consts(k)
    wrap_triton(_sfq_bwd_kernel)[(rows * nb,)](
        grad_y, x, dx if need_dx else x, part, s, r, C, inner, nb, float(qn), float(qp),
        float(k), tanh_scale, g_scale, SOFT=bool(soft), K0=(k == 0.0), NEED_DX=bool(need_dx),
        NEED_DS=bool(need_ds), BLOCK=BLOCK)
    if need_ds:
        ds = (part.view(outer, C, nb).sum(dim=(0, 2)) * gamma).reshape(scale.shape)
    else:
        ds = scale.new_empty(0)
    return dx, ds

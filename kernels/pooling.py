"""Triton kernels of temporal pooling + horizontal pyramid pooling (the math is in
qgait/ops/pooling.py).

One program per (output row n', channel c): it holds the whole [H, W] map of that item in
registers (BLOCK = next power of two of H*W; gait maps are 16x11 .. 64x44), folds the frames of
its sequence into it with a running max (and the first arg-max frame), then reduces each strip
of the pyramid with masked sums / maxima. The backward builds dL/dz in registers the same way
and writes each frame of dx once. Runs under TRITON_INTERPRET=1 (no libdevice calls).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _row(it, base_ptr, len_ptr, C, HW, cstride, BLOCK: tl.constexpr):
    """Where program ``it`` (output row n', channel c) reads: the offset of its first frame,
    its frame count, and the lanes over the H*W map."""
    n = it // C
    c = it % C
    base = tl.load(base_ptr + n) + c.to(tl.int64) * cstride
    L = tl.load(len_ptr + n)
    offs = tl.arange(0, BLOCK)
    return base, L, offs, offs < HW


@triton.jit
def _sph_fwd_kernel(x_ptr, out_ptr, targ_ptr, sarg_ptr, base_ptr, len_ptr, row0_ptr, row1_ptr,
                    C, HW, W, B, cstride, MODE: tl.constexpr, NEED_T: tl.constexpr,
                    NEED_S: tl.constexpr, HPP: tl.constexpr, BLOCK: tl.constexpr):
    it = tl.program_id(0)
    base, L, offs, mask = _row(it, base_ptr, len_ptr, C, HW, cstride, BLOCK)
    z = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    idx = tl.zeros([BLOCK], dtype=tl.int32)
    for t in range(1, L):
        v = tl.load(x_ptr + base + t * HW + offs, mask=mask, other=0.0).to(tl.float32)
        # torch.max's rule: larger, or NaN over non-NaN (the first NaN wins and stays); ties
        # keep the first frame
        m = (v > z) | ((v != v) & (z == z))
        z = tl.where(m, v, z)
        idx = tl.where(m, t, idx)
    if NEED_T:
        tl.store(targ_ptr + it.to(tl.int64) * HW + offs, idx, mask=mask)
    if HPP:
        rows = offs // W
        for j in range(B):
            r0 = tl.load(row0_ptr + j)
            r1 = tl.load(row1_ptr + j)
            sm = mask & (rows >= r0) & (rows < r1)
            mean = tl.sum(tl.where(sm, z, 0.0), axis=0) / ((r1 - r0) * W).to(tl.float32)
            mx = tl.max(tl.where(sm, z, float("-inf")), axis=0)
            # a NaN in the strip is its max (torch.max); reductions need not propagate NaN
            nan = sm & (z != z)
            has_nan = tl.max(nan.to(tl.int32), axis=0) > 0
            mx = tl.where(has_nan, float("nan"), mx)
            if MODE == 0:
                val = mean + mx
            elif MODE == 1:
                val = mx
            else:
                val = mean
            tl.store(out_ptr + it * B + j, val.to(out_ptr.dtype.element_ty))
            if NEED_S:
                # first row-major position of the strip's max (of its first NaN, if any)
                hit = tl.where(has_nan, nan, sm & (z == mx))
                arg = tl.min(tl.where(hit, offs, BLOCK), axis=0)
                tl.store(sarg_ptr + it * B + j, arg)
    else:
        tl.store(out_ptr + it.to(tl.int64) * HW + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sph_bwd_kernel(g_ptr, targ_ptr, sarg_ptr, dx_ptr, base_ptr, len_ptr, row0_ptr, row1_ptr,
                    C, HW, W, B, cstride, MODE: tl.constexpr, HAS_T: tl.constexpr,
                    HPP: tl.constexpr, BLOCK: tl.constexpr):
    it = tl.program_id(0)
    base, L, offs, mask = _row(it, base_ptr, len_ptr, C, HW, cstride, BLOCK)
    if HPP:
        # dL/dz: each mean term spreads g / (rows * W) over its strip, each max term adds g at
        # its arg-max.
        rows = offs // W
        dz = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(B):
            g = tl.load(g_ptr + it * B + j).to(tl.float32)
            if MODE != 1:
                r0 = tl.load(row0_ptr + j)
                r1 = tl.load(row1_ptr + j)
                sm = (rows >= r0) & (rows < r1)
                dz += tl.where(sm, g / ((r1 - r0) * W).to(tl.float32), 0.0)
            if MODE != 2:
                a = tl.load(sarg_ptr + it * B + j)
                dz += tl.where(offs == a, g, 0.0)
    else:
        dz = tl.load(g_ptr + it.to(tl.int64) * HW + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_T:
        idx = tl.load(targ_ptr + it.to(tl.int64) * HW + offs, mask=mask, other=-1)
    else:
        idx = tl.zeros([BLOCK], dtype=tl.int32)
    for t in range(0, L):
        tl.store(dx_ptr + base + t * HW + offs,
                 tl.where(idx == t, dz, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)


def _tables(shape, seqL, bins, device):
    """(base offset per output row, length per output row, strip row0, strip row1)."""
    N, C, T, H, W = shape
    HW = H * W
    if len(seqL) == 0:
        base = [n * C * T * HW for n in range(N)]
        lens = [T] * N
    else:
        starts = [sum(seqL[:i]) for i in range(len(seqL))]
        base = [s * HW for s in starts]
        lens = list(seqL)
    r0, r1 = [], []
    for b in bins:
        for i in range(b):
            r0.append((i * H) // b)
            r1.append(-((-(i + 1) * H) // b))
    if not r0:
        r0, r1 = [0], [H]
    t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    return (t(base, torch.int64), t(lens, torch.int32), t(r0, torch.int32), t(r1, torch.int32))


def _launch_fwd(x, seqL, bins, mode, need_idx, hpp):
    from torch.library import wrap_triton

    x = x.contiguous()
    N, C, T, H, W = x.shape
    n_out = len(seqL) if len(seqL) else N
    B = sum(bins) if hpp else 0
    base, lens, r0, r1 = _tables(x.shape, seqL, bins if hpp else [], x.device)
    need_t = bool(need_idx and T > 1)
    need_s = bool(need_idx and hpp and mode != 2)
    out = x.new_empty((n_out, C, B) if hpp else (n_out, C, H, W))
    targ = x.new_empty((n_out, C, H, W) if need_t else (0,), dtype=torch.int32)
    sarg = x.new_empty((n_out, C, B) if need_s else (0,), dtype=torch.int32)
    wrap_triton(_sph_fwd_kernel)[(n_out * C,)](
        x, out, targ, sarg, base, lens, r0, r1, C, H * W, W, max(B, 1), T * H * W,
        MODE=int(mode), NEED_T=need_t, NEED_S=need_s, HPP=hpp,
        BLOCK=triton.next_power_of_2(H * W))
    return out, targ, sarg


def _launch_bwd(grad, targ, sarg, x_shape, seqL, bins, mode, hpp):
    from torch.library import wrap_triton

    N, C, T, H, W = x_shape
    grad = grad.contiguous()
    n_out = len(seqL) if len(seqL) else N
    B = sum(bins) if hpp else 0
    base, lens, r0, r1 = _tables(x_shape, seqL, bins if hpp else [], grad.device)
    dx = grad.new_empty(list(x_shape))
    wrap_triton(_sph_bwd_kernel)[(n_out * C,)](
        grad, targ, sarg, dx, base, lens, r0, r1, C, H * W, W, max(B, 1), T * H * W,
        MODE=int(mode), HAS_T=bool(T > 1), HPP=hpp, BLOCK=triton.next_power_of_2(H * W))
    return dx


def set_pool_hpp_fwd(x, seqL, bins, mode, need_idx):
    return _launch_fwd(x, seqL, bins, mode, need_idx, True)


def set_pool_hpp_bwd(grad, targ, sarg, x_shape, seqL, bins, mode):
    return _launch_bwd(grad, targ, sarg, x_shape, seqL, bins, mode, True)


def temporal_pool_fwd(x, seqL, need_idx):
    out, targ, _ = _launch_fwd(x, seqL, [], 0, need_idx, False)
    return out, targ


def temporal_pool_bwd(grad, targ, x_shape, seqL):
    return _launch_bwd(grad, targ, targ, x_shape, seqL, [], 0, False)

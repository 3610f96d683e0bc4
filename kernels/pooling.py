"""Triton kernels of temporal pooling + horizontal pyramid pooling (the math is in
qgait/ops/pooling.py).

One program per (output row n', channel c): it holds the whole [H, W] map of that item in
registers (BLOCK = next power of two of H*W; gait maps are 16x11 .. 64x44), folds the frames of
its sequence into it with a running max (and the first arg-max frame), then reduces each strip
of the pyramid with masked sums / maxima. The backward builds dL/dz in registers the same way
and writes each frame of dx once. Runs under TRITON_INTERPRET=1 (no libdevice calls).

No tables travel to the device: where each program's sequence starts and how long it is come
from the sequence lengths passed by value (a tuple of scalar kernel arguments, summed in the
kernel), and the strip bounds of the pyramid are computed in the kernel from the bins (a
constexpr tuple) and H. A call therefore makes no host-to-device copy (no host sync, and it can
be captured in a CUDA graph). Lengths are passed as ``2 * L + 1``: Triton specializes an int
argument equal to 1 or divisible by 16, inside tuples too, which would compile a new variant
for each pattern of such lengths in a batch; odd values >= 3 are never specialized.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _row(it, C, T, HW, SEQ, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr):
    """Where program ``it`` (output row n', channel c) reads: the offset of its first frame,
    its frame count, and the lanes over the H*W map. Without seqL item n' has T frames at
    frame n' * C * T; with seqL (N = 1) sequence n' starts at frame sum(seqL[:n'])."""
    n = it // C
    c = it % C
    if HAS_SEQ:
        start = 0
        L = 0
        for i in tl.static_range(len(SEQ)):
            li = SEQ[i] >> 1  # SEQ holds 2 * L + 1 (see the module docstring)
            start += tl.where(i < n, li, 0)
            L = tl.where(i == n, li, L)
        frame0 = start.to(tl.int64)
    else:
        frame0 = n.to(tl.int64) * C * T
        L = T
    base = (frame0 + c.to(tl.int64) * T) * HW
    offs = tl.arange(0, BLOCK)
    return base, L, offs, offs < HW


@triton.jit
def _sph_fwd_kernel(x_ptr, out_ptr, targ_ptr, sarg_ptr, C, T, H, W, SEQ,
                    HAS_SEQ: tl.constexpr, BINS: tl.constexpr, NSTRIP: tl.constexpr,
                    MODE: tl.constexpr, NEED_T: tl.constexpr, NEED_S: tl.constexpr,
                    HPP: tl.constexpr, BLOCK: tl.constexpr):
    it = tl.program_id(0)
    HW = H * W
    base, L, offs, mask = _row(it, C, T, HW, SEQ, HAS_SEQ, BLOCK)
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
        j0 = 0  # first strip of the current bin
        for bi in tl.static_range(len(BINS)):
            for i in range(BINS[bi]):
                # strip i of b: rows [floor(i H / b), ceil((i + 1) H / b))
                r0 = (i * H) // BINS[bi]
                r1 = ((i + 1) * H + BINS[bi] - 1) // BINS[bi]
                j = it.to(tl.int64) * NSTRIP + j0 + i
                sm = mask & (rows >= r0) & (rows < r1)
                # IEEE division: ``/`` is div.full.f32 (2 ulp) on a GPU, the CPU rounds once
                mean = tl.div_rn(tl.sum(tl.where(sm, z, 0.0), axis=0),
                                 ((r1 - r0) * W).to(tl.float32))
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
                tl.store(out_ptr + j, val.to(out_ptr.dtype.element_ty))
                if NEED_S:
                    # first row-major position of the strip's max (of its first NaN, if any)
                    hit = tl.where(has_nan, nan, sm & (z == mx))
                    arg = tl.min(tl.where(hit, offs, BLOCK), axis=0)
                    tl.store(sarg_ptr + j, arg)
            j0 += BINS[bi]
    else:
        tl.store(out_ptr + it.to(tl.int64) * HW + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sph_bwd_kernel(g_ptr, targ_ptr, sarg_ptr, dx_ptr, C, T, H, W, SEQ,
                    HAS_SEQ: tl.constexpr, BINS: tl.constexpr, NSTRIP: tl.constexpr,
                    MODE: tl.constexpr, HAS_T: tl.constexpr, HPP: tl.constexpr,
                    BLOCK: tl.constexpr):
    it = tl.program_id(0)
    HW = H * W
    base, L, offs, mask = _row(it, C, T, HW, SEQ, HAS_SEQ, BLOCK)
    if HPP:
        # dL/dz: each mean term spreads g / (rows * W) over its strip, each max term adds g at
        # its arg-max.
        rows = offs // W
        dz = tl.zeros([BLOCK], dtype=tl.float32)
        j0 = 0
        for bi in tl.static_range(len(BINS)):
            for i in range(BINS[bi]):
                j = it.to(tl.int64) * NSTRIP + j0 + i
                g = tl.load(g_ptr + j).to(tl.float32)
                if MODE != 1:
                    r0 = (i * H) // BINS[bi]
                    r1 = ((i + 1) * H + BINS[bi] - 1) // BINS[bi]
                    sm = (rows >= r0) & (rows < r1)
                    dz += tl.where(sm, tl.div_rn(g, ((r1 - r0) * W).to(tl.float32)), 0.0)
                if MODE != 2:
                    a = tl.load(sarg_ptr + j)
                    dz += tl.where(offs == a, g, 0.0)
            j0 += BINS[bi]
    else:
        dz = tl.load(g_ptr + it.to(tl.int64) * HW + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_T:
        idx = tl.load(targ_ptr + it.to(tl.int64) * HW + offs, mask=mask, other=-1)
    else:
        idx = tl.zeros([BLOCK], dtype=tl.int32)
    for t in range(0, L):
        tl.store(dx_ptr + base + t * HW + offs,
                 tl.where(idx == t, dz, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)


def _scalars(seqL, bins, hpp):
    """The kernels' by-value description of the sequences and strips: (SEQ, HAS_SEQ, BINS)."""
    seq = tuple(2 * int(v) + 1 for v in seqL) or (1,)
    return seq, len(seqL) > 0, tuple(int(b) for b in bins) if hpp else (1,)


def _launch_fwd(x, seqL, bins, mode, need_idx, hpp):
    from torch.library import wrap_triton

    from qgait.kernels.soft_quant import launch_opts

    x = x.contiguous()
    N, C, T, H, W = x.shape
    n_out = len(seqL) if len(seqL) else N
    B = sum(bins) if hpp else 0
    seq, has_seq, bins_t = _scalars(seqL, bins, hpp)
    need_t = bool(need_idx and T > 1)
    need_s = bool(need_idx and hpp and mode != 2)
    out = x.new_empty((n_out, C, B) if hpp else (n_out, C, H, W))
    targ = x.new_empty((n_out, C, H, W) if need_t else (0,), dtype=torch.int32)
    sarg = x.new_empty((n_out, C, B) if need_s else (0,), dtype=torch.int32)
    wrap_triton(_sph_fwd_kernel)[(n_out * C,)](
        x, out, targ, sarg, C, T, H, W, seq, HAS_SEQ=has_seq, BINS=bins_t,
        NSTRIP=sum(bins_t), MODE=int(mode), NEED_T=need_t, NEED_S=need_s, HPP=hpp,
        BLOCK=triton.next_power_of_2(H * W), **launch_opts())
    return out, targ, sarg


def _launch_bwd(grad, targ, sarg, x_shape, seqL, bins, mode, hpp):
    from torch.library import wrap_triton

    from qgait.kernels.soft_quant import launch_opts

    N, C, T, H, W = x_shape
    grad = grad.contiguous()
    n_out = len(seqL) if len(seqL) else N
    seq, has_seq, bins_t = _scalars(seqL, bins, hpp)
    dx = grad.new_empty(list(x_shape))
    wrap_triton(_sph_bwd_kernel)[(n_out * C,)](
        grad, targ, sarg, dx, C, T, H, W, seq, HAS_SEQ=has_seq, BINS=bins_t,
        NSTRIP=sum(bins_t), MODE=int(mode), HAS_T=bool(T > 1), HPP=hpp,
        BLOCK=triton.next_power_of_2(H * W), **launch_opts())
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

"""Triton kernel of the packed low-bit Conv3d (the math is in qgait/ops/packed_conv3d.py).

Implicit GEMM: rows m = output pixels (n, t, h, w), columns = output channels, reduction
k = (tap, input channel) with k = tap * C_in + c. Each program owns a [BM, BN] tile and walks
k in blocks of BK:

* A block: the input element of every (pixel, k) is gathered with its strides (any memory
  order), out-of-window positions read as code 0 (zero padding). A float input is quantized
  here, ``rint(clamp(x * r, qn, qp))``. Codes are shifted into int8 by ``zp`` (128 for an
  unsigned grid, else 0) so that ``tl.dot`` runs int8 x int8 -> int32; the shift is undone
  exactly with ``zp * sum(w)`` per output channel.
* B block: int8 weights, or int4 bytes unpacked with shifts: the low nibble is the even
  channel, ``(b << 4) >> 4`` and ``b >> 4`` on int8 sign-extend the two nibbles.
* Epilogue (fp32, no fused multiply-add: its products are ``mul.rn`` on a GPU, which neither
  LLVM nor ptxas contracts, whatever the compile options): rescale, bias, folded BatchNorm,
  activation, then fp32 / requantized / int32 store, channels-last.

The reciprocals of the activation steps are IEEE divisions in the kernel (``tl.div_rn``: a
``1 / s`` in the launcher is compiled by Inductor to approximate division on a GPU), and the
steps are checked there by device asserts (see ``qgait.kernels.soft_quant.launch_opts``).
Launched through ``torch.library.wrap_triton`` so that torch.compile / export can trace it.
GPU tiles are 64 x 64 x 64 with 8 warps: at 4 warps the tile spills 670-1120 bytes of
registers per thread (ptxas -v, sm_90 / sm_80); tests/test_triton.py checks for no spills.

Runs under TRITON_INTERPRET=1 (tiny shapes) as well as on GPUs; no libdevice calls.
"""
import torch
import triton
import triton.language as tl


# 64 x 64 x 64 tiles: 8 warps hold them in registers (4 spilled; see the module docstring)
NUM_WARPS = 8


@triton.jit
def _mul_rn(a, b, GPU: tl.constexpr):
    """a * b rounded once, never contracted with a following add into an FMA: PTX mul.rn
    (explicit rounding: ptxas does not fuse it; inline asm: LLVM cannot). The epilogue relies
    on it whatever the compile options (Inductor compiles user kernels with fp fusion on)."""
    if GPU:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _rint(v):
    # 1.5 * 2^23: for |v| < 2^22, (v + M) - M rounds half to even in fp32
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _packed_conv3d_kernel(
        x_ptr, w_ptr, y_ptr, comp_ptr, m1_ptr, bias_ptr, g_ptr, beta_ptr, s_ptr, ws_ptr,
        M, K, Co, C, CB,
        T, H, W, To, Ho, Wo, kH, kW,
        sxn, sxc, sxt, sxh, sxw,
        sT, sH, sW, pT, pH, pW, dT, dH, dW,
        in_qn, in_qp, zp, slope, out_qn, out_qp,
        IS_FLOAT: tl.constexpr, INT4: tl.constexpr, HAS_BN: tl.constexpr, ACT: tl.constexpr,
        OUT_MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        GPU: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < Co
    # output pixel -> (n, t, h, w)
    ow = rm % Wo
    oh = (rm // Wo) % Ho
    ot = (rm // (Wo * Ho)) % To
    on = rm // (Wo * Ho * To)
    # the activation steps (from memory: no host sync to read them), checked, and their fp32
    # reciprocals rounded once, as the reference and soft_fake_quant do
    s_in = tl.load(s_ptr)
    s_out = tl.load(s_ptr + 1)
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=1.0)
    tl.device_assert((s_in > 0.0) & (s_in < float("inf")) & (s_out > 0.0)
                     & (s_out < float("inf")),
                     "qgait::packed_conv3d: x_scale and out_scale must be finite and > 0")
    tl.device_assert((ws > 0.0) & (ws < float("inf")),
                     "qgait::packed_conv3d: w_scale must be finite and > 0")
    r_in = tl.div_rn(1.0, s_in)
    r_out = tl.div_rn(1.0, s_out)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        c = rk % C
        tap = rk // C
        kw_ = tap % kW
        kh_ = (tap // kW) % kH
        kt_ = tap // (kW * kH)
        it = ot[:, None] * sT + kt_[None, :] * dT - pT
        ih = oh[:, None] * sH + kh_[None, :] * dH - pH
        iw = ow[:, None] * sW + kw_[None, :] * dW - pW
        inside = (it >= 0) & (it < T) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_mask = m_ok[:, None] & k_ok[None, :] & inside
        a_off = (on[:, None].to(tl.int64) * sxn + c[None, :] * sxc + it * sxt + ih * sxh
                 + iw * sxw)
        if IS_FLOAT:
            xv = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
            v = xv * r_in
            v = tl.minimum(tl.maximum(v, in_qn), in_qp)
            code = _rint(v).to(tl.int32)
        else:
            code = tl.load(x_ptr + a_off, mask=a_mask, other=0).to(tl.int32)
        a = (code - zp).to(tl.int8)
        if INT4:
            b_off = rn[None, :] * (K // C * CB) + tap[:, None] * CB + (c[:, None] // 2)
            byte = tl.load(w_ptr + b_off, mask=k_ok[:, None] & n_ok[None, :], other=0)
            sb = byte.to(tl.int8)
            lo = (sb << 4) >> 4          # arithmetic shift on int8 sign-extends the nibble
            hi = sb >> 4
            b = tl.where((c[:, None] % 2) == 1, hi, lo)
        else:
            b_off = rn[None, :] * K + rk[:, None]
            b = tl.load(w_ptr + b_off, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    comp = tl.load(comp_ptr + rn, mask=n_ok, other=0)
    acc = acc + comp[None, :]
    y_off = rm[:, None].to(tl.int64) * Co + rn[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if OUT_MODE == 2:
        tl.store(y_ptr + y_off, acc, mask=y_mask)
    else:
        m1 = tl.load(m1_ptr + rn, mask=n_ok, other=0.0)
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0)
        z = _mul_rn(acc.to(tl.float32), m1[None, :], GPU)
        z = z + bias[None, :]
        if HAS_BN:
            g = tl.load(g_ptr + rn, mask=n_ok, other=0.0)
            beta = tl.load(beta_ptr + rn, mask=n_ok, other=0.0)
            z = _mul_rn(z, g[None, :], GPU)
            z = z + beta[None, :]
        if ACT == 1:
            z = tl.where(z < 0, 0.0, z)
        if ACT == 2:
            z = tl.where(z < 0, z * slope, z)
        if OUT_MODE == 0:
            tl.store(y_ptr + y_off, z, mask=y_mask)
        else:
            q = _rint(tl.minimum(tl.maximum(z * r_out, out_qn), out_qp))
            tl.store(y_ptr + y_off, q.to(tl.int32).to(y_ptr.dtype.element_ty), mask=y_mask)


def _out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def forward(x, x_scale, in_qn, in_qp, w_packed, w_scale, w_bits, c_in, stride, padding,
            dilation, bias, bn_scale, bn_shift, act, neg_slope, out_mode, out_scale, out_qn,
            out_qp):
    """Launcher (arguments as torch.ops.qgait.packed_conv3d; checks done by the caller)."""
    from torch.library import wrap_triton

    from qgait.kernels.soft_quant import launch_opts

    N, C, T, H, W = x.shape
    Co, kT, kH, kW, CB = w_packed.shape
    To, Ho, Wo = (_out(s, k, st, p, d) for s, k, st, p, d in
                  zip((T, H, W), (kT, kH, kW), stride, padding, dilation))
    dev = x.device
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    zp = 128 if in_qn >= 0 else 0
    K = kT * kH * kW * C
    if w_bits == 4:
        w = w_packed.contiguous()
        # int32 sum of the weights, for the zero-point correction
        from qgait.quant.packing import unpack_weight
        wsum = unpack_weight(w_packed, 4, c_in).to(torch.int32).sum(dim=(1, 2, 3, 4))
    else:
        w = w_packed.contiguous()
        wsum = w.to(torch.int32).sum(dim=(1, 2, 3, 4))
    comp = (wsum * zp).to(torch.int32).contiguous()
    xs = x_scale.reshape(()).float()
    m1 = (xs * w_scale.float()).contiguous()
    b = bias.float().contiguous() if bias is not None else torch.zeros(Co, device=dev)
    g = bn_scale.contiguous() if bn_scale is not None else m1
    beta = bn_shift.contiguous() if bn_shift is not None else m1
    ydt = (torch.float32 if out_mode == 0 else torch.int32 if out_mode == 2
           else torch.int8 if out_qn < 0 else torch.uint8)
    y = torch.empty((N, To, Ho, Wo, Co), dtype=ydt, device=dev)
    M = N * To * Ho * Wo
    os_ = out_scale.reshape(()).float() if out_mode == 1 else torch.ones((), device=dev)
    steps = torch.stack((xs, os_)).contiguous()
    interp = dev.type == "cpu"
    BM, BN, BK = (16, 16, 32) if interp else (64, 64, 64)
    grid = (triton.cdiv(M, BM), triton.cdiv(Co, BN))
    extra = launch_opts()
    if not interp:
        extra["num_warps"] = NUM_WARPS
        if not torch.compiler.is_compiling():
            # belt and braces (the epilogue's products are _mul_rn already); Inductor sets its
            # own compile options for user kernels
            extra["enable_fp_fusion"] = False
    wrap_triton(_packed_conv3d_kernel)[grid](
        x, w, y, comp, m1, b, g, beta, steps, w_scale.float().contiguous(),
        M, K, Co, C, CB, T, H, W, To, Ho, Wo, kH, kW,
        *x.stride(), *stride, *padding, *dilation,
        float(in_qn), float(in_qp), zp, float(neg_slope), float(out_qn), float(out_qp),
        IS_FLOAT=x.dtype == torch.float32, INT4=w_bits == 4, HAS_BN=bn_scale is not None,
        ACT=act, OUT_MODE=out_mode, BM=BM, BN=BN, BK=BK, GPU=not interp, **extra)
    return y.permute(0, 4, 1, 2, 3)

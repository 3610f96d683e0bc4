"""Ops on integer codes between the layers of a packed model, with their pure-PyTorch references.

``max_pool_codes(x, kernel, stride)``
    Max pooling of int8 / uint8 codes ``[N, C, T, H, W]`` (no padding, dilation 1, floor
    sizes); the output is channels_last_3d, the layout the next packed layer reads fastest.
    Pooling commutes with the monotone requantization before it, so a packed model can pool
    the codes it passes from one convolution to the next. Exact (a maximum of integers).

``part_linear_codes(x, a_scale, qn, qp, w, w_scale)``
    The per-part FCs of a packed model on codes: ``x`` ``[N, C_in, P]`` fp32 is quantized
    as :func:`~qgait.ops.soft_fake_quant` does (``round(clamp(x * (1 / a_scale), qn, qp))``,
    half to even), multiplied with the integer weights ``w`` ``[P, C_out, C_in]`` (int8) in
    exact integer sums, and scaled: ``y[n, o, p] = float(sum_i c[n, i, p] * w[p, o, i]) *
    a_scale * w_scale[p * C_out + o]`` (two fp32 products, in that order). An ``(n, p)`` whose
    input holds a NaN gives NaN outputs. The fake-quant layer multiplies the same integers by
    the same steps in fp32 (sums rounded term by term), so the two agree up to fp32 rounding.

On the CPU both run as C++ kernels (``qgait::_max_pool_codes``, ``qgait::_part_linear_codes``)
when the extension is built, and equal the references bit for bit; elsewhere the references
run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qgait import _ext

_HAS_POOL = _ext.has_kernel("_max_pool_codes", "CPU")
_HAS_FC = _ext.has_kernel("_part_linear_codes", "CPU")


def _triple(v) -> tuple[int, int, int]:
    return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v),) * 3


# ---------------------------------------------------------------------------------------------
# References (pure PyTorch).
# ---------------------------------------------------------------------------------------------
def max_pool_codes_ref(x: torch.Tensor, kernel, stride=None) -> torch.Tensor:
    """``max_pool3d`` of the codes through fp32 (exact for 8-bit integers)."""
    k = _triple(kernel)
    s = k if stride is None else _triple(stride)
    y = F.max_pool3d(x.float(), k, s)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last_3d)


def part_linear_codes_ref(x, a_scale, qn, qp, w, w_scale) -> torch.Tensor:
    """The integer part FCs in int64 (see the module docstring)."""
    s = a_scale.float().reshape(())
    v = x.float() * (1.0 / s)
    c = torch.round(torch.clamp(v, qn, qp))
    nan = torch.isnan(c).any(1, keepdim=True)                             # [N, 1, P]
    acc = torch.einsum("nip,poi->nop", torch.nan_to_num(c).long(), w.long())
    P, cout = w.shape[0], w.shape[1]
    y = acc.float() * s * w_scale.float().reshape(P, cout).t()[None]
    return y.masked_fill(nan, float("nan"))


# ---------------------------------------------------------------------------------------------
# Ops.
# ---------------------------------------------------------------------------------------------
def max_pool_codes(x: torch.Tensor, kernel, stride=None) -> torch.Tensor:
    """Max pooling of int8 / uint8 codes (module docstring); the C++ kernel on the CPU."""
    k = _triple(kernel)
    s = k if stride is None else _triple(stride)
    if _HAS_POOL and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.ops.qgait._max_pool_codes(x, list(k), list(s))
    return max_pool_codes_ref(x, k, s)


def part_linear_codes(x, a_scale, qn: int, qp: int, w, w_scale) -> torch.Tensor:
    """The per-part FCs on codes (module docstring); the C++ kernel on the CPU. No autograd."""
    if (_HAS_FC and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        return torch.ops.qgait._part_linear_codes(x, a_scale, int(qn), int(qp), w, w_scale)
    return part_linear_codes_ref(x, a_scale, qn, qp, w, w_scale)

r"""Packing of integer weights for the low-bit kernels (:mod:`qgait.ops.packed_conv3d`).

Layout of a packed Conv3d weight (``pack_weight``), for ``w_int`` of shape
``[C_out, C_in, kT, kH, kW]`` (PyTorch's Conv3d order):

* **int8** (``bits=8``): dtype ``torch.int8``, shape ``[C_out, kT, kH, kW, C_in]``, one signed
  value per byte: ``packed[o, t, h, w, c] = w_int[o, c, t, h, w]``.
* **int4** (``bits=4``): dtype ``torch.uint8``, shape ``[C_out, kT, kH, kW, ceil(C_in / 2)]``,
  two signed 4-bit values (two's complement, ``-8..7``) per byte along the input channel, the
  lower-indexed channel in the low nibble (the ONNX ``INT4`` / PyTorch ``quint4x2`` order):
  ``byte[o, t, h, w, j] = (w_int[o, 2j] & 0xF) | (w_int[o, 2j+1] & 0xF) << 4``.
  When ``C_in`` is odd the last high nibble is 0.

The input channel is innermost because every kernel reduces over it: the CPU kernel feeds four
(int8) or eight (int4) consecutive channels of one tap to one ``vpdpbusd`` lane, the CUDA and
Triton kernels read a tap's channels as one contiguous row. Steps are per output channel
(``w_scale [C_out]`` fp32, symmetric grid, no zero point).
"""
from __future__ import annotations

import torch

_OP = "pack_weight"


def weight_grid(bits: int) -> tuple[int, int]:
    """Signed grid of a ``bits``-bit weight: ``(-2^(b-1), 2^(b-1) - 1)``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def storage_bits(w_bits: int) -> int:
    """Packed storage width for a ``w_bits``-bit weight: 4 for 2..4 bits, 8 for 5..8."""
    if not isinstance(w_bits, int) or not 2 <= w_bits <= 8:
        raise ValueError(f"qgait::{_OP}: w_bits must be an integer in 2..8, got {w_bits!r}")
    return 4 if w_bits <= 4 else 8


def quantize_weight(w: torch.Tensor, w_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weights ``round_half_even(clamp(w * fp32(1 / w_scale), qn, qp))``.

    This is exactly the integer grid of ``soft_fake_quant(w, w_scale, bits, signed=True,
    axis=0, mode="hard")`` (whose output is these integers times ``w_scale``).

    Args:
        w: ``[C_out, ...]`` float weight.
        w_scale: ``[C_out]`` fp32 steps (> 0).
        bits: 2..8.
    Returns:
        ``int8`` tensor shaped like ``w``.
    """
    qn, qp = weight_grid(bits)
    s = w_scale.detach().float().reshape([-1] + [1] * (w.dim() - 1))
    r = 1.0 / s
    return torch.round(torch.clamp(w.detach().float() * r, qn, qp)).to(torch.int8)


def pack_weight(w_int: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs ``w_int [C_out, C_in, kT, kH, kW]`` (integer values) into the layout above.

    Args:
        w_int: integer-valued tensor (any integer or float dtype) of Conv3d weight shape.
        bits: 8 or 4; values must lie in the signed ``bits``-bit grid.
    Returns:
        int8 ``[C_out, kT, kH, kW, C_in]`` (bits 8) or uint8 ``[C_out, kT, kH, kW, ceil(C_in/2)]``
        (bits 4).
    """
    if bits not in (4, 8):
        raise ValueError(f"qgait::{_OP}: bits must be 8 or 4, got {bits!r}")
    if w_int.dim() != 5:
        raise ValueError(f"qgait::{_OP}: w_int must be [C_out, C_in, kT, kH, kW], got "
                         f"{tuple(w_int.shape)}")
    if w_int.is_floating_point() and not bool((w_int == torch.round(w_int)).all()):
        raise ValueError(f"qgait::{_OP}: w_int must hold integers")
    qn, qp = weight_grid(bits)
    wi = w_int.to(torch.int16)
    if wi.numel() and (int(wi.min()) < qn or int(wi.max()) > qp):
        raise ValueError(f"qgait::{_OP}: values must lie in [{qn}, {qp}] for {bits} bits, got "
                         f"[{int(wi.min())}, {int(wi.max())}]")
    wi = wi.permute(0, 2, 3, 4, 1).contiguous()  # C_in innermost
    if bits == 8:
        return wi.to(torch.int8)
    if wi.shape[-1] % 2:
        wi = torch.nn.functional.pad(wi, (0, 1))
    nib = (wi & 0xF).to(torch.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()


def unpack_weight(packed: torch.Tensor, bits: int, c_in: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: int8 ``[C_out, C_in, kT, kH, kW]``."""
    if bits not in (4, 8):
        raise ValueError(f"qgait::unpack_weight: bits must be 8 or 4, got {bits!r}")
    want = torch.int8 if bits == 8 else torch.uint8
    cb = c_in if bits == 8 else (c_in + 1) // 2
    if packed.dtype != want or packed.dim() != 5 or packed.shape[-1] != cb:
        raise ValueError(f"qgait::unpack_weight: expected {want} [C_out, kT, kH, kW, {cb}] for "
                         f"bits={bits}, c_in={c_in}; got {packed.dtype} {tuple(packed.shape)}")
    if bits == 8:
        w = packed
    else:
        p = packed.to(torch.int16)
        lo, hi = p & 0xF, (p >> 4) & 0xF
        w = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :c_in]
        w = ((w ^ 8) - 8).to(torch.int8)  # sign-extend the 4-bit two's complement
    return w.permute(0, 4, 1, 2, 3).contiguous()

r"""Packed low-bit Conv3d for inference: int8 / int4 weights, integer arithmetic, fused epilogue.

The math (every backend computes exactly these integers, and the same fp32 epilogue):

* Input codes ``x_int``: a float ``x`` is quantized on the fly with the layer's activation step
  ``x_scale`` and grid ``[in_qn, in_qp]`` (unsigned ``[0, 2^b-1]`` after a ReLU, signed
  ``[-2^(b-1), 2^(b-1)-1]`` otherwise) exactly as ``soft_fake_quant`` in hard mode:
  ``x_int = round_half_even(clamp(x * fp32(1 / x_scale), in_qn, in_qp))``. An int8 / uint8
  ``x`` already holds the codes (e.g. the requantized output of the previous packed layer); a
  bool ``x`` is a binary silhouette, used as is (``x_scale = 1``, grid ``[0, 1]``).
* Weights ``w_int`` (signed, per-output-channel step ``w_scale[c]``), packed as described in
  :mod:`qgait.quant.packing`.
* ``acc[n, c, t, h, w] = sum_{i, kt, kh, kw} x_int[n, i, t*sT + kt*dT - pT, ...] *
  w_int[c, i, kt, kh, kw]`` in int32, exact (zero padding).
* Epilogue, fp32, in this order and without fused multiply-adds:
  ``z = float(acc) * m[c] + bias[c]`` with ``m[c] = fp32(x_scale * w_scale[c])``;
  ``z = z * bn_scale[c] + bn_shift[c]`` (a folded BatchNorm, optional);
  ReLU ``max(z, 0)`` or LeakyReLU ``z < 0 ? z * slope : z`` (optional); then either
  ``y = z`` (fp32 out), or ``y = round_half_even(clamp(z * fp32(1 / out_scale), out_qn,
  out_qp))`` (int8 / uint8 out: the next layer's input codes), or ``acc`` itself (int32 out).
* The output is ``[N, C_out, T', H', W']`` in ``torch.channels_last_3d`` memory order (the
  kernels compute channels-last), so an int8 output feeds the next packed layer directly.

A NaN in a float ``x`` has no integer code: the CPU kernel maps it to ``in_qn``.

Backends: ``reference`` (float64 conv3d of integer-valued tensors: exact), ``cpu`` (C++,
AVX512-VNNI / AVX2 / scalar), ``cuda`` (dp4a implicit GEMM), ``triton`` (implicit GEMM with
``tl.dot`` on int8 blocks).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from qgait import _backend, _ext
from qgait.ops.soft_quant import check_step_values, quant_grid
from qgait.quant.packing import unpack_weight

OP = "packed_conv3d"
ACTS = {"none": 0, "relu": 1, "leaky_relu": 2}
OUTS = {"float": 0, "quant": 1, "acc": 2}


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the truth every backend is tested against.
# ---------------------------------------------------------------------------------------------
def input_codes_ref(x, x_scale, in_qn, in_qp):
    """Integer codes of the input as float64 (exact), per the math above."""
    if x.dtype == torch.float32:
        r = 1.0 / x_scale.reshape(()).float()
        return torch.round(torch.clamp(x * r, in_qn, in_qp)).double()
    return x.double()


def epilogue_ref(acc, x_scale, w_scale, bias, bn_scale, bn_shift, act, neg_slope, out_mode,
                 out_scale, out_qn, out_qp):
    """The fp32 epilogue of the math above on int32 accumulators ``[N, C, T, H, W]``."""
    if out_mode == OUTS["acc"]:
        return acc.to(torch.int32)

    def ch(v):
        return v.float().reshape(1, -1, 1, 1, 1)

    m = x_scale.reshape(()).float() * w_scale.float()
    z = acc.float() * ch(m)
    z = z + (ch(bias) if bias is not None else 0.0)
    if bn_scale is not None:
        z = z * ch(bn_scale)
        z = z + ch(bn_shift)
    if act == ACTS["relu"]:
        z = torch.where(z < 0, torch.zeros_like(z), z)
    elif act == ACTS["leaky_relu"]:
        z = torch.where(z < 0, z * torch.tensor(neg_slope, dtype=torch.float32), z)
    if out_mode == OUTS["float"]:
        return z
    r = 1.0 / out_scale.reshape(()).float()
    q = torch.round(torch.clamp(z * r, out_qn, out_qp))
    return q.to(torch.int8 if out_qn < 0 else torch.uint8)


def packed_conv3d_ref(x, x_scale, in_qn, in_qp, w_packed, w_scale, w_bits, c_in, stride, padding,
                      dilation, bias, bn_scale, bn_shift, act, neg_slope, out_mode, out_scale,
                      out_qn, out_qp):
    """Reference of the op (same arguments as ``torch.ops.qgait.packed_conv3d``)."""
    xi = input_codes_ref(x, x_scale, in_qn, in_qp)
    wi = unpack_weight(w_packed, w_bits, c_in).double()
    # |acc| < 2^31 << 2^53: float64 sums of integer products are exact in any order
    acc = torch.round(F.conv3d(xi, wi, None, stride, padding, dilation)).to(torch.int32)
    y = epilogue_ref(acc, x_scale, w_scale, bias, bn_scale, bn_shift, act, neg_slope, out_mode,
                     out_scale, out_qn, out_qp)
    return y.contiguous(memory_format=torch.channels_last_3d)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementation, shared by the C++ and Triton ops.
# ---------------------------------------------------------------------------------------------
def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _fake(x, x_scale, in_qn, in_qp, w_packed, w_scale, w_bits, c_in, stride, padding, dilation,
          bias, bn_scale, bn_shift, act, neg_slope, out_mode, out_scale, out_qn, out_qp):
    ks = w_packed.shape[1:4]
    sizes = [_out_size(x.shape[2 + i], ks[i], stride[i], padding[i], dilation[i])
             for i in range(3)]
    dt = (torch.float32 if out_mode == 0 else torch.int32 if out_mode == 2
          else torch.int8 if out_qn < 0 else torch.uint8)
    return x.new_empty([x.shape[0], w_packed.shape[0], *sizes], dtype=dt).contiguous(
        memory_format=torch.channels_last_3d)


if _ext.HAS_C:
    torch.library.register_fake(f"qgait::{OP}")(_fake)

# ---------------------------------------------------------------------------------------------
# Triton (kernels/packed_conv3d.py).
# ---------------------------------------------------------------------------------------------
_TRITON_OK, _TRITON_WHY = _ext.triton_status()
if _TRITON_OK:
    from qgait.kernels import packed_conv3d as _tk

    @torch.library.triton_op(f"qgait::{OP}_triton", mutates_args=())
    def _packed_triton(x: torch.Tensor, x_scale: torch.Tensor, in_qn: int, in_qp: int,
                       w_packed: torch.Tensor, w_scale: torch.Tensor, w_bits: int, c_in: int,
                       stride: list[int], padding: list[int], dilation: list[int],
                       bias: torch.Tensor | None, bn_scale: torch.Tensor | None,
                       bn_shift: torch.Tensor | None, act: int, neg_slope: float, out_mode: int,
                       out_scale: torch.Tensor | None, out_qn: int, out_qp: int) -> torch.Tensor:
        return _tk.forward(x, x_scale, in_qn, in_qp, w_packed, w_scale, w_bits, c_in, stride,
                           padding, dilation, bias, bn_scale, bn_shift, act, neg_slope,
                           out_mode, out_scale, out_qn, out_qp)

    # Its own fake: triton_op would otherwise trace the launcher with fake tensors (which the
    # interpreter cannot run); torch.compile / export / opcheck use this one.
    _packed_triton.register_fake(_fake)


# ---------------------------------------------------------------------------------------------
# Backends and the public function.
# ---------------------------------------------------------------------------------------------
def _why_not_reference(x):
    return []


# Looked up once: torch.compile cannot trace the dispatcher query inside the public function.
_HAS_CPU = _ext.has_kernel(OP, "CPU")
_HAS_BINARY_CODES = _ext.has_kernel("_binary_codes", "CPU")
_HAS_CUDA = _ext.has_kernel(OP, "CUDA")


def _why_not_cpu(x):
    return _backend.native_reasons(_HAS_CPU, "cpu", x)


def _why_not_cuda(x):
    return _backend.native_reasons(_HAS_CUDA, "cuda", x)


def _why_not_triton(x):
    return _backend.triton_reasons((_TRITON_OK, _TRITON_WHY), x)


_BACKENDS = (
    _backend.Backend("cuda", _why_not_cuda, lambda *a: torch.ops.qgait.packed_conv3d(*a)),
    _backend.Backend("triton", _why_not_triton,
                     lambda *a: torch.ops.qgait.packed_conv3d_triton(*a), auto_on_cpu=False),
    _backend.Backend("cpu", _why_not_cpu, lambda *a: torch.ops.qgait.packed_conv3d(*a)),
    _backend.Backend("reference", _why_not_reference, packed_conv3d_ref),
)


def _triple(name, v, lo):
    def ok(e):
        return isinstance(e, int) and not isinstance(e, bool) and e >= lo
    # (a float or a string is not iterable into 3 ints: the same error, not a bare TypeError)
    t = (v,) * 3 if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(t) != 3 or not all(ok(e) for e in t):
        raise ValueError(f"qgait::{OP}: {name} must be an int or 3 ints >= {lo}, got {v!r}")
    return list(t)


def _grid(bits, signed, what):
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"qgait::{OP}: {what} bits must be an integer in 2..8, got {bits!r}")
    return quant_grid(bits, signed)


def _check_scale(name, s, n=None):
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        raise TypeError(f"qgait::{OP}: {name} must be a float32 tensor, got "
                        f"{getattr(s, 'dtype', type(s).__name__)}")
    if n is not None and (s.dim() != 1 or s.shape[0] != n):
        raise ValueError(f"qgait::{OP}: {name} must have shape [{n}], got {tuple(s.shape)}")
    if n is None and s.numel() != 1:
        raise ValueError(f"qgait::{OP}: {name} must have one element, got {tuple(s.shape)}")
    check_step_values(s, name, OP)


def packed_conv3d(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, *, w_bits: int,
                  c_in: int, x_scale: torch.Tensor | None = None, in_bits: int = 8,
                  in_signed: bool = False, stride=1, padding=0, dilation=1,
                  bias: torch.Tensor | None = None, bn_scale: torch.Tensor | None = None,
                  bn_shift: torch.Tensor | None = None, act: str = "none",
                  neg_slope: float = 0.01, out: str = "float",
                  out_scale: torch.Tensor | None = None, out_bits: int = 8,
                  out_signed: bool = False, backend: str | None = None) -> torch.Tensor:
    """Low-bit Conv3d with packed weights (math in the module docstring).

    Args:
        x: ``[N, C_in, T, H, W]``: float32 (quantized here with ``x_scale`` on the
            ``in_bits`` / ``in_signed`` grid), int8 / uint8 codes on that grid, or bool
            (binary input: pass ``x_scale=None``).
        w_packed: from :func:`qgait.quant.pack_weight` (int8 or int4 layout).
        w_scale: ``[C_out]`` fp32 weight steps. w_bits: 8 or 4 (the packed layout).
        c_in: input channels (the int4 layout cannot tell an odd count from its padding).
        x_scale: ``[]`` fp32 activation step; None for a binary input.
        stride, padding, dilation: as ``nn.Conv3d`` (zero padding).
        bias, bn_scale, bn_shift: ``[C_out]`` fp32, optional (``bn_*``: a folded BatchNorm).
        act: "none", "relu" or "leaky_relu" (``neg_slope``).
        out: "float" (fp32), "quant" (codes on ``out_scale``'s ``out_bits`` grid: int8 when
            ``out_signed`` else uint8) or "acc" (the int32 accumulators).
        backend: "auto" (default, or ``QGAIT_BACKEND``), "cpu", "cuda", "triton", "reference".

    Returns:
        ``[N, C_out, T', H', W']`` in channels_last_3d memory order.

    Example:
        >>> y = packed_conv3d(x, pack_weight(w_int, 4), w_scale, w_bits=4, c_in=32,
        ...                   x_scale=torch.tensor(0.05), padding=1, act="relu")
    """
    prep = _prepare(x, w_packed, w_scale, w_bits, c_in, x_scale, in_bits, in_signed, stride,
                    padding, dilation, bias, bn_scale, bn_shift, act, neg_slope, out, out_scale,
                    out_bits, out_signed, backend)
    return _run(x, prep)


def _prepare(x, w_packed, w_scale, w_bits, c_in, x_scale, in_bits, in_signed, stride, padding,
             dilation, bias, bn_scale, bn_shift, act, neg_slope, out, out_scale, out_bits,
             out_signed, backend):
    """Every check and conversion that depends on x only through its device and dtype:
    (backend, the op's arguments after x). PackedConv3d keeps it between calls."""
    if not isinstance(x, torch.Tensor) or not isinstance(w_packed, torch.Tensor):
        raise TypeError(f"qgait::{OP}: x and w_packed must be tensors")
    device, dtype = x.device, x.dtype
    if w_bits not in (4, 8):
        raise ValueError(f"qgait::{OP}: w_bits must be 8 or 4, got {w_bits!r}")
    want = torch.int8 if w_bits == 8 else torch.uint8
    if w_packed.dtype != want:
        raise TypeError(f"qgait::{OP}: w_bits={w_bits} needs a {want} packed weight, got "
                        f"{w_packed.dtype} (was it packed with other bits?)")
    cb = c_in if w_bits == 8 else (c_in + 1) // 2
    if w_packed.dim() != 5 or w_packed.shape[-1] != cb:
        raise ValueError(f"qgait::{OP}: packed weight must be [C_out, kT, kH, kW, {cb}] for "
                         f"c_in={c_in}, w_bits={w_bits}; got {tuple(w_packed.shape)}")
    co = w_packed.shape[0]
    if x_scale is None:
        if dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"qgait::{OP}: without x_scale x must be a binary bool / uint8 "
                            f"tensor, got {dtype}")
        x_scale = torch.ones((), device=device)
        in_qn, in_qp = 0, 1 if dtype == torch.bool else 255
    else:
        if dtype not in (torch.float32, torch.int8, torch.uint8):
            raise TypeError(f"qgait::{OP}: x must be float32, int8 or uint8 (or bool without "
                            f"x_scale), got {dtype}")
        in_qn, in_qp = _grid(in_bits, in_signed, "input")
        if dtype == torch.int8 and not in_signed or dtype == torch.uint8 and in_signed:
            raise TypeError(f"qgait::{OP}: x dtype {dtype} does not match in_signed="
                            f"{in_signed}")
        _check_scale("x_scale", x_scale)
        # a 0-dim step may live on the CPU, as torch's scalar tensors may beside CUDA ones
        x_scale = x_scale.reshape(()).to(device)
    _check_scale("w_scale", w_scale, co)
    for name, v in (("bias", bias), ("bn_scale", bn_scale), ("bn_shift", bn_shift)):
        if v is not None and (v.dtype != torch.float32 or v.shape != (co,)):
            raise ValueError(f"qgait::{OP}: {name} must be float32 [{co}], got {v.dtype} "
                             f"{tuple(v.shape)}")
    if (bn_scale is None) != (bn_shift is None):
        raise ValueError(f"qgait::{OP}: bn_scale and bn_shift must be given together")
    if act not in ACTS:
        raise ValueError(f"qgait::{OP}: act must be one of {list(ACTS)}, got {act!r}")
    if out not in OUTS:
        raise ValueError(f"qgait::{OP}: out must be one of {list(OUTS)}, got {out!r}")
    out_qn, out_qp = 0, 0
    if out == "quant":
        if out_scale is None:
            raise ValueError(f"qgait::{OP}: out='quant' needs out_scale (the next layer's step)")
        _check_scale("out_scale", out_scale)
        out_scale = out_scale.reshape(()).to(device)
        out_qn, out_qp = _grid(out_bits, out_signed, "output")
    st, pd, dl = (_triple("stride", stride, 1), _triple("padding", padding, 0),
                  _triple("dilation", dilation, 1))
    # (every why_not of this op reads x's device only)
    impl = _backend.select(OP, _BACKENDS, backend, device.type == "cpu", x)
    return impl, (x_scale, in_qn, in_qp, w_packed, w_scale, int(w_bits), int(c_in), st, pd, dl,
                  bias, bn_scale, bn_shift, ACTS[act], float(neg_slope), OUTS[out], out_scale,
                  out_qn, out_qp)


def _run(x, prep):
    """The per-call part: x's shape against the prepared arguments, then the kernel."""
    impl, args = prep
    w_packed, c_in, st, pd, dl = args[3], args[6], args[7], args[8], args[9]
    if x.dim() != 5:
        raise ValueError(f"qgait::{OP}: x must be [N, C_in, T, H, W], got {tuple(x.shape)}")
    if x.shape[1] != c_in:
        raise ValueError(f"qgait::{OP}: x has {x.shape[1]} input channels, the weight "
                         f"expects {c_in}")
    sizes = [_out_size(x.shape[2 + i], w_packed.shape[1 + i], st[i], pd[i], dl[i])
             for i in range(3)]
    if min(sizes) < 1:
        raise ValueError(f"qgait::{OP}: input {tuple(x.shape)} is too small for kernel "
                         f"{tuple(w_packed.shape[1:4])} with padding {pd} and dilation {dl}")
    return impl.run(x, *args)


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
class PackedConv3d(torch.nn.Module):
    """Inference Conv3d with packed int8 / int4 weights and integer arithmetic.

    Built by :func:`qgait.quant.convert` from a trained ``SoftQuantConv3d`` (optionally with the
    BatchNorm3d and ReLU / LeakyReLU after it folded into the epilogue), or by hand. Input
    ``[N, C_in, T, H, W]``: float32 (quantized with ``a_scale`` inside the op), int8 / uint8
    codes on this layer's activation grid (from a previous packed layer with ``out_scale`` set),
    or, when ``a_bits is None``, a binary silhouette (bool / uint8, or float holding only 0 and
    1). Output ``[N, C_out, T', H', W']`` (channels_last_3d): fp32, or the next layer's codes
    when ``out_scale`` is set.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv3d`` (zero padding; ``groups`` must be 1).
        w_bits: 2..8 weight bits (stored as int4 for <= 4, else int8).
        a_bits: 2..8 activation bits, or None for a binary input. a_signed: activation grid.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, w_bits=8, a_bits=8, a_signed=False, device=None):
        super().__init__()
        from qgait.quant.packing import storage_bits

        if groups != 1:
            raise ValueError(f"qgait::{OP}: PackedConv3d supports groups=1 only, got "
                             f"groups={groups}")
        if a_bits is not None:
            _grid(a_bits, a_signed, "activation")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = tuple(_triple("kernel_size", kernel_size, 1))
        self.stride = tuple(_triple("stride", stride, 1))
        self.padding = tuple(_triple("padding", padding, 0))
        self.dilation = tuple(_triple("dilation", dilation, 1))
        self.w_bits, self.a_bits, self.a_signed = int(w_bits), a_bits, bool(a_signed)
        self.storage_bits = storage_bits(self.w_bits)
        cb = in_channels if self.storage_bits == 8 else (in_channels + 1) // 2
        dt = torch.int8 if self.storage_bits == 8 else torch.uint8
        self.register_buffer("w_packed", torch.zeros(out_channels, *self.kernel_size, cb,
                                                     dtype=dt, device=device))
        self.register_buffer("w_scale", torch.ones(out_channels, device=device))
        self.register_buffer("a_scale", torch.ones((), device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device) if bias else None)
        self.register_buffer("bn_scale", None)
        self.register_buffer("bn_shift", None)
        self.register_buffer("out_scale", None)  # set: output the next layer's codes
        self.act, self.neg_slope = "none", 0.01
        self.out_bits, self.out_signed = 8, False
        self.backend = None

    @classmethod
    def from_soft(cls, conv, bn: torch.nn.BatchNorm3d | None = None,
                  act: torch.nn.Module | None = None) -> "PackedConv3d":
        """From a trained ``SoftQuantConv3d`` (hard-mode integers of its learned steps),
        folding an eval-mode ``bn`` (running statistics) and a ReLU / LeakyReLU ``act``."""
        from qgait.quant.packing import pack_weight, quantize_weight

        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"qgait::{OP}: only zero padding given as numbers is supported, "
                             f"got padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, w_bits=conv.w_bits,
                a_bits=conv.a_bits, a_signed=bool(conv.a_signed) if conv.a_bits else False,
                device=conv.weight.device)
        with torch.no_grad():
            w_int = quantize_weight(conv.weight, conv.w_scale, conv.w_bits)
            m.w_packed.copy_(pack_weight(w_int, m.storage_bits))
            m.w_scale.copy_(conv.w_scale.detach().float())
            m.a_scale.copy_(conv.a_scale.detach().float().reshape(()))
            if conv.bias is not None:
                m.bias.copy_(conv.bias.detach().float())
            if bn is not None:
                inv = torch.rsqrt(bn.running_var.float() + bn.eps)
                g = bn.weight.detach().float() * inv if bn.affine else inv
                b = bn.bias.detach().float() if bn.affine else torch.zeros_like(inv)
                m.bn_scale = g.contiguous()
                m.bn_shift = (b - bn.running_mean.float() * g).contiguous()
        if isinstance(act, torch.nn.ReLU):
            m.act = "relu"
        elif isinstance(act, torch.nn.LeakyReLU):
            m.act, m.neg_slope = "leaky_relu", float(act.negative_slope)
        elif act is not None:
            raise ValueError(f"qgait::{OP}: cannot fold activation {type(act).__name__}")
        return m

    def __getstate__(self):
        # the kept arguments (see forward) hold the backend's callable: not part of the state
        state = dict(super().__getstate__())
        state.pop("_prepared", None)
        return state

    def set_output_quant(self, out_scale: torch.Tensor | None, bits: int = 8,
                         signed: bool = False) -> None:
        """Requantize the output to the next layer's step (None: fp32 output)."""
        self.out_scale = None if out_scale is None else out_scale.detach().float().reshape(())
        self.out_bits, self.out_signed = int(bits), bool(signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"qgait::{OP}: x and w_packed must be tensors")
        b, d = self._buffers, self.__dict__
        x_scale = b["a_scale"]
        if d["a_bits"] is None:
            x_scale = None
            if x.is_floating_point():
                if (_HAS_BINARY_CODES and x.device.type == "cpu" and x.dtype == torch.float32
                        and not torch.compiler.is_compiling()):
                    # codes and the check in one C++ pass (~0.11 ms in the four torch passes
                    # below for a 30-frame 64 x 44 sequence)
                    xb, bad = torch.ops.qgait._binary_codes(x)
                else:
                    # anything but 0 / 1 (also > 1, negative, NaN: clamped or wrapped) comes
                    # back different
                    xb = x.to(torch.uint8).clamp_(max=1)
                    bad = not torch.equal(xb.to(x.dtype), x)
                if bad:
                    raise ValueError(f"qgait::{OP}: this layer takes a binary input (a_bits="
                                     "None) but x holds values other than 0 and 1")
                x = xb
        # The checks and conversions of every argument but x are kept between calls (they
        # were ~36 us of Python per call), keyed by x's device and dtype, the backend asked
        # for, and every attribute the call reads: tensors by identity and version (the kept
        # arguments hold them, so an identity stays theirs; an in-place write, load_state_dict
        # or .to() changes the key). The key reads buffers and attributes from the module's
        # dicts: through nn.Module's attribute lookup it took 10-15 us per call, now ~3 us (a
        # packed GaitLite3D makes 6 calls per sequence in ~4 ms on 2 threads).
        tensors = (b["w_packed"], b["w_scale"], x_scale, b["bias"], b["bn_scale"],
                   b["bn_shift"], b["out_scale"])
        key = None
        if not torch.compiler.is_compiling():
            ids = []
            for t in tensors:
                if t is None:
                    ids.append(None)
                elif t.is_inference():   # no version counter: nothing can be kept
                    ids = None
                    break
                else:
                    ids.append((id(t), t._version))
            if ids is not None:
                key = (x.device, x.dtype, d["backend"], os.environ.get("QGAIT_BACKEND"),
                       tuple(ids), d["storage_bits"], d["in_channels"], d["a_bits"],
                       d["a_signed"], d["stride"], d["padding"], d["dilation"], d["act"],
                       d["neg_slope"], d["out_bits"], d["out_signed"])
                kept = d.get("_prepared")
                if kept is not None and kept[0] == key:
                    return _run(x, kept[1])
        prep = _prepare(
            x, self.w_packed, self.w_scale, self.storage_bits, self.in_channels, x_scale,
            self.a_bits or 8, self.a_signed, self.stride, self.padding, self.dilation, self.bias,
            self.bn_scale, self.bn_shift, self.act, self.neg_slope,
            "quant" if self.out_scale is not None else "float", self.out_scale, self.out_bits,
            self.out_signed, self.backend)
        if key is not None:
            self.__dict__["_prepared"] = (key, prep)
        return _run(x, prep)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
             f"w_bits={self.w_bits} (int{self.storage_bits}), a_bits={self.a_bits}")
        if self.bn_scale is not None:
            s += ", bn folded"
        if self.act != "none":
            s += f", act={self.act}"
        if self.out_scale is not None:
            s += f", out=int{self.out_bits}"
        return s

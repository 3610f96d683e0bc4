r"""Temporal (set) pooling and horizontal pyramid pooling, fused: the head of every silhouette
gait model, as one op that reads the feature map once.

Semantics (those of OpenGait, which users compare against):

* ``temporal_pool(x, seqL)``: ``x [N, C, T, H, W] -> [N, C, H, W]``, max over T. With ``seqL``
  (per-sequence frame counts; N = 1, sum(seqL) = T) the sequences packed along T are pooled
  separately -> ``[len(seqL), C, H, W]``.
* ``horizontal_pyramid_pool(x, bins)``: ``x [N, C, H, W] -> [N, C, sum(bins)]``. For each ``b`` in
  ``bins``, H is cut into ``b`` horizontal strips; strip ``i`` covers rows
  ``[floor(i H / b), ceil((i + 1) H / b))`` (adaptive pooling's boundaries; when ``b`` divides H
  these are the equal strips of OpenGait's HorizontalPoolingPyramid, otherwise neighbouring
  strips share a row). Each strip gives ``mean + max`` over its rows and all columns (or only
  the max / the mean with ``mode``); levels are concatenated in the order of ``bins``.
  ``H < max(bins)`` is an error (a strip would be empty).
* ``set_pool_hpp(x, seqL, bins)``: both in one pass over the 5-D tensor:
  ``[N, C, T, H, W] -> [N or len(seqL), C, sum(bins)]``.

Gradients: the mean term spreads ``dL/dout`` uniformly over its strip; each max term sends it to
its arg-max element, the first in (t, then row-major h, w) order on ties, so the result is
deterministic and equal to that of ``torch.max(dim)``-based code. The fused op's gradient equals
that of the two separate ops composed. Accumulation is fp32 for float16 / bfloat16 / float32
inputs (fp64 for fp64 on the reference backend); the output has the input's dtype. NaN
follows ``torch.max`` on every backend: a NaN in a window makes its max (and mean) NaN, and the
max term's gradient goes to the window's first NaN (in the same t, row, column order).

Backends: ``reference`` (pure PyTorch, the truth), ``cpu`` (C++, AVX-512 / AVX2 / scalar),
``cuda`` (CUDA C++), ``triton``. See :mod:`qgait._backend` for how one is chosen. The ``cuda``
backend states the shapes its kernels cannot take (:func:`cuda_limit_reasons`: a fused map
whose H x W does not fit one block's shared memory, more than 16 pyramid levels), and ``auto``
then falls back to the next backend. The C++ and
Triton ops save int32 arg-max indices only when ``x`` requires grad (the backward then reads
``[N', C, H, W]`` indices instead of the 5-D input).
"""
from __future__ import annotations

from typing import Sequence

import torch

from qgait import _backend, _ext

OP_TP = "temporal_pool"
OP_HPP = "horizontal_pyramid_pool"
OP_SPH = "set_pool_hpp"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MODES = {"mean+max": 0, "max": 1, "mean": 2}
DEFAULT_BINS = (16, 8, 4, 2, 1)


def strip_bounds(H: int, b: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, end)`` of the ``b`` strips of a height-``H`` map (adaptive pooling)."""
    return [((i * H) // b, -((-(i + 1) * H) // b)) for i in range(b)]


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the truth every backend is tested against.
# ---------------------------------------------------------------------------------------------
def temporal_pool_ref(x: torch.Tensor, seqL: Sequence[int] | None = None) -> torch.Tensor:
    """Max over T (dim 2) of ``[N, C, T, H, W]``, per packed sequence when ``seqL`` is given."""
    if seqL is None:
        return x.max(dim=2)[0]
    parts = torch.split(x, list(seqL), dim=2)
    return torch.cat([p.max(dim=2)[0] for p in parts], dim=0)


def horizontal_pyramid_pool_ref(x: torch.Tensor, bins: Sequence[int] = DEFAULT_BINS,
                                mode: str = "mean+max") -> torch.Tensor:
    """``[N, C, H, W] -> [N, C, sum(bins)]``; strips as in the module docstring."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(cdt)
    N, C, H, W = z.shape
    outs = []
    for b in bins:
        if H % b == 0:
            s = z.reshape(N, C, b, (H // b) * W)
            parts = [s]
        else:
            parts = [z[:, :, lo:hi].reshape(N, C, 1, -1) for lo, hi in strip_bounds(H, b)]
        for s in parts:
            if mode == "mean+max":
                outs.append(s.mean(-1) + s.max(-1)[0])
            elif mode == "max":
                outs.append(s.max(-1)[0])
            else:
                outs.append(s.mean(-1))
    return torch.cat(outs, dim=-1).to(x.dtype)


def set_pool_hpp_ref(x: torch.Tensor, seqL: Sequence[int] | None = None,
                     bins: Sequence[int] = DEFAULT_BINS, mode: str = "mean+max") -> torch.Tensor:
    """The composition ``horizontal_pyramid_pool_ref(temporal_pool_ref(x, seqL), bins, mode)``."""
    return horizontal_pyramid_pool_ref(temporal_pool_ref(x, seqL), bins, mode)


# ---------------------------------------------------------------------------------------------
# The C++ ops (csrc/cpu/pooling.cpp, csrc/cuda/pooling_bind.cpp): fake impls and autograd.
#   set_pool_hpp(x, seqL, bins, mode, need_idx) -> (out [N',C,B], targ [N',C,H,W], sarg [N',C,B])
#   temporal_pool(x, seqL, need_idx) -> (out [N',C,H,W], targ [N',C,H,W])
# seqL = [] means "no packing"; targ (temporal arg-max) is empty unless need_idx and T > 1,
# sarg (strip arg-max, flat h*W+w) is empty unless need_idx and mode has a max term.
# ---------------------------------------------------------------------------------------------
def _n_out(x, seqL):
    return len(seqL) if len(seqL) > 0 else x.shape[0]


def _fake_sph(x, seqL, bins, mode, need_idx):
    N, C, T, H, W = x.shape
    n = _n_out(x, seqL)
    out = x.new_empty((n, C, sum(bins)))
    targ = x.new_empty((n, C, H, W), dtype=torch.int32) if need_idx and T > 1 else \
        x.new_empty((0,), dtype=torch.int32)
    sarg = x.new_empty((n, C, sum(bins)), dtype=torch.int32) if need_idx and mode != 2 else \
        x.new_empty((0,), dtype=torch.int32)
    return out, targ, sarg


def _fake_sph_bwd(grad, targ, sarg, x_shape, seqL, bins, mode):
    return grad.new_empty(list(x_shape))


def _fake_tp(x, seqL, need_idx):
    N, C, T, H, W = x.shape
    n = _n_out(x, seqL)
    out = x.new_empty((n, C, H, W))
    targ = x.new_empty((n, C, H, W), dtype=torch.int32) if need_idx and T > 1 else \
        x.new_empty((0,), dtype=torch.int32)
    return out, targ


def _fake_tp_bwd(grad, targ, x_shape, seqL):
    return grad.new_empty(list(x_shape))


def _sph_setup(ctx, inputs, output):
    x, seqL, bins, mode, need_idx = inputs
    _, targ, sarg = output
    ctx.save_for_backward(targ, sarg)
    ctx.args = (list(x.shape), seqL, bins, mode, need_idx)
    ctx.mark_non_differentiable(targ, sarg)
    # The index outputs get no gradient; without this autograd would allocate zeros for them.
    ctx.set_materialize_grads(False)


def _tp_setup(ctx, inputs, output):
    x, seqL, need_idx = inputs
    _, targ = output
    ctx.save_for_backward(targ)
    ctx.args = (list(x.shape), seqL, need_idx)
    ctx.mark_non_differentiable(targ)
    ctx.set_materialize_grads(False)


def _make_sph_backward(backward_op):
    def backward(ctx, grad_out, _g_targ, _g_sarg):
        targ, sarg = ctx.saved_tensors
        x_shape, seqL, bins, mode, need_idx = ctx.args
        if grad_out is None:
            return None, None, None, None, None
        if not need_idx:
            raise RuntimeError(f"qgait::{OP_SPH}: backward needs the arg-max indices; the forward "
                               "ran with need_idx=False (call it with need_idx=True)")
        dx = backward_op(grad_out.contiguous(), targ, sarg, x_shape, seqL, bins, mode)
        return dx, None, None, None, None

    return backward


def _make_tp_backward(backward_op):
    def backward(ctx, grad_out, _g_targ):
        (targ,) = ctx.saved_tensors
        x_shape, seqL, need_idx = ctx.args
        if grad_out is None:
            return None, None, None
        if not need_idx:
            raise RuntimeError(f"qgait::{OP_TP}: backward needs the arg-max indices; the forward "
                               "ran with need_idx=False (call it with need_idx=True)")
        return backward_op(grad_out.contiguous(), targ, x_shape, seqL), None, None

    return backward


def _has_c_ops() -> bool:
    return _ext.HAS_C and hasattr(torch.ops.qgait, OP_SPH)


def _register(suffix: str) -> None:
    """Fake impls and autograd for one family of ops: ``qgait::set_pool_hpp{suffix}`` and
    ``qgait::temporal_pool{suffix}`` with their ``..._backward`` ops (suffix "" for the C++
    kernels, "_triton" for the Triton ones)."""
    sph, tp = f"{OP_SPH}{suffix}", f"{OP_TP}{suffix}"
    torch.library.register_fake(f"qgait::{sph}")(_fake_sph)
    torch.library.register_fake(f"qgait::{sph}_backward")(_fake_sph_bwd)
    torch.library.register_fake(f"qgait::{tp}")(_fake_tp)
    torch.library.register_fake(f"qgait::{tp}_backward")(_fake_tp_bwd)
    sph_bwd = getattr(torch.ops.qgait, f"{sph}_backward")
    tp_bwd = getattr(torch.ops.qgait, f"{tp}_backward")
    torch.library.register_autograd(f"qgait::{sph}", _make_sph_backward(sph_bwd),
                                    setup_context=_sph_setup)
    torch.library.register_autograd(f"qgait::{tp}", _make_tp_backward(tp_bwd),
                                    setup_context=_tp_setup)


if _has_c_ops():
    _register("")

# ---------------------------------------------------------------------------------------------
# Triton (kernels/pooling.py), registered with torch.library.triton_op.
# ---------------------------------------------------------------------------------------------
_TRITON_OK, _TRITON_WHY = _ext.triton_status()
if _TRITON_OK:
    from qgait.kernels import pooling as _tk

    @torch.library.triton_op(f"qgait::{OP_SPH}_triton", mutates_args=())
    def _sph_triton(x: torch.Tensor, seqL: list[int], bins: list[int], mode: int,
                    need_idx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.set_pool_hpp_fwd(x, seqL, bins, mode, need_idx)

    @torch.library.triton_op(f"qgait::{OP_SPH}_triton_backward", mutates_args=())
    def _sph_triton_bwd(grad: torch.Tensor, targ: torch.Tensor, sarg: torch.Tensor,
                        x_shape: list[int], seqL: list[int], bins: list[int],
                        mode: int) -> torch.Tensor:
        return _tk.set_pool_hpp_bwd(grad, targ, sarg, x_shape, seqL, bins, mode)

    @torch.library.triton_op(f"qgait::{OP_TP}_triton", mutates_args=())
    def _tp_triton(x: torch.Tensor, seqL: list[int],
                   need_idx: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.temporal_pool_fwd(x, seqL, need_idx)

    @torch.library.triton_op(f"qgait::{OP_TP}_triton_backward", mutates_args=())
    def _tp_triton_bwd(grad: torch.Tensor, targ: torch.Tensor, x_shape: list[int],
                       seqL: list[int]) -> torch.Tensor:
        return _tk.temporal_pool_bwd(grad, targ, x_shape, seqL)

    # Explicit fake impls: tracing the Triton launch under FakeTensorMode would run the
    # interpreter (TRITON_INTERPRET=1) on fake tensors.
    _register("_triton")


# ---------------------------------------------------------------------------------------------
# Backends and the public functions. Every backend runs the two primitive ops
#   sph(x5, seqL, bins, mode) -> [N', C, B]   and   tp(x5, seqL) -> [N', C, H, W];
# horizontal_pyramid_pool(x) is sph(x.unsqueeze(2)) with T = 1 (no temporal indices kept).
# ---------------------------------------------------------------------------------------------
# Every why_not takes (x, hpp, bins): hpp is False for temporal_pool (no pyramid).
def _why_not_reference(x, hpp=True, bins=(), n_seq=0):
    return []


# Looked up once: torch.compile cannot trace the dispatcher query inside the public functions.
_HAS_KERNEL = {key: _has_c_ops() and _ext.has_kernel(OP_SPH, key) for key in ("CPU", "CUDA")}

# The CUDA kernels' shape limits (csrc/cuda/pooling.cu, pool_cuda_limit states the same).
CUDA_MAX_LEVELS = 16
_CUDA_SEQ_CHUNK = 128
_SMEM_OPTIN: dict[int, int] = {}  # per device index, looked up once


def cuda_limit_reasons(shape, n_seq: int, hpp: bool, n_levels: int, smem_optin: int) -> list[str]:
    """Why the CUDA pooling kernels cannot take x of ``shape`` [N, C, T, H, W] (``n_seq``
    packed sequences, 0 without seqL) on a GPU with ``smem_optin`` bytes of shared memory per
    block. Only the fused pyramid keeps the H x W map in shared memory; temporal pooling has no
    limit but the grid's. A 4-D ``[N, C, H, W]`` shape is one frame."""
    N, C, T, H, W = shape if len(shape) == 5 else (*shape[:2], 1, *shape[2:])
    why = []
    if hpp and n_levels > CUDA_MAX_LEVELS:
        why.append(f"more than {CUDA_MAX_LEVELS} pyramid levels (bins entries) in one call")
    rows = min(n_seq, _CUDA_SEQ_CHUNK) if n_seq > 0 else N
    if rows * C > 2**31 - 1:
        why.append("N * C is above the grid limit of 2^31 - 1 blocks")
    if T > 2**31 - 1 or H * W > 2**31 - 1:
        why.append("T or H * W does not fit int32")
    if hpp:
        need = max(H * W + 3 * H, H * W + H) * 4
        if need > smem_optin:
            why.append(f"H*W = {H * W}: the fused pyramid keeps the map in shared memory "
                       f"({need} bytes), this GPU has {smem_optin} per block")
    return why


def _smem_optin(device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM_OPTIN:
        props = torch.cuda.get_device_properties(idx)
        _SMEM_OPTIN[idx] = int(getattr(props, "shared_memory_per_block_optin",
                                       props.shared_memory_per_block))
    return _SMEM_OPTIN[idx]


def _why_not_native(device_type, key):
    def why_not(x, hpp=True, bins=(), n_seq=0):
        why = (_backend.native_reasons(_HAS_KERNEL[key], device_type, x)
               + _backend.float_reasons(x, _FLOATS))
        if device_type == "cuda" and not why:  # a shape the kernels cannot take: fall back
            why = cuda_limit_reasons(x.shape, n_seq, hpp, len(bins), _smem_optin(x.device))
        return why

    return why_not


def _why_not_triton(x, hpp=True, bins=(), n_seq=0):
    return (_backend.triton_reasons((_TRITON_OK, _TRITON_WHY), x)
            + _backend.float_reasons(x, _FLOATS))


def _need_idx(x):
    return bool(x.requires_grad and torch.is_grad_enabled())


def _mode_name(mode: int) -> str:
    return {v: k for k, v in MODES.items()}[mode]


class _Impl:
    """How one backend runs the two primitives (seqL is a list, [] for no packing)."""

    def __init__(self, sph, tp):
        self.sph, self.tp = sph, tp


def _ref_sph(x, seqL, bins, mode):
    return set_pool_hpp_ref(x, seqL or None, bins, _mode_name(mode))


def _ref_tp(x, seqL):
    return temporal_pool_ref(x, seqL or None)


_IMPLS = {
    "reference": _Impl(_ref_sph, _ref_tp),
    "cpu": _Impl(lambda x, s, b, m: torch.ops.qgait.set_pool_hpp(x, s, b, m, _need_idx(x))[0],
                 lambda x, s: torch.ops.qgait.temporal_pool(x, s, _need_idx(x))[0]),
    "cuda": _Impl(lambda x, s, b, m: torch.ops.qgait.set_pool_hpp(x, s, b, m, _need_idx(x))[0],
                  lambda x, s: torch.ops.qgait.temporal_pool(x, s, _need_idx(x))[0]),
    "triton": _Impl(
        lambda x, s, b, m: torch.ops.qgait.set_pool_hpp_triton(x, s, b, m, _need_idx(x))[0],
        lambda x, s: torch.ops.qgait.temporal_pool_triton(x, s, _need_idx(x))[0]),
}

_BACKENDS = (
    _backend.Backend("cuda", _why_not_native("cuda", "CUDA"), _IMPLS["cuda"]),
    _backend.Backend("triton", _why_not_triton, _IMPLS["triton"], auto_on_cpu=False),
    _backend.Backend("cpu", _why_not_native("cpu", "CPU"), _IMPLS["cpu"]),
    _backend.Backend("reference", _why_not_reference, _IMPLS["reference"]),
)


def _check_x(op, x, rank):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"qgait::{op}: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"qgait::{op}: x must be a floating-point tensor "
                        f"(float32/float16/bfloat16), got {x.dtype}")
    if x.dim() != rank:
        want = "[N, C, T, H, W]" if rank == 5 else "[N, C, H, W]"
        raise ValueError(f"qgait::{op}: x must have {rank} dims {want}, got shape "
                         f"{tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"qgait::{op}: x must not be empty, got shape {tuple(x.shape)}")


def _check_seqL(op, x, seqL) -> list[int]:
    """Validates ``seqL`` against x [N, C, T, H, W]; returns it as a list ([] for None)."""
    if seqL is None:
        return []
    if isinstance(seqL, torch.Tensor):
        if seqL.dim() != 1 or seqL.is_floating_point() or seqL.is_complex():
            raise ValueError(f"qgait::{op}: seqL must be a 1-D integer tensor or a list of ints, "
                             f"got a {seqL.dim()}-D {seqL.dtype} tensor")
        seqL = seqL.tolist()  # a host sync for device tensors; pass a list to avoid it
    elif isinstance(seqL, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in seqL):
            raise ValueError(f"qgait::{op}: seqL must contain ints, got {seqL!r}")
        seqL = list(seqL)
    else:
        raise TypeError(f"qgait::{op}: seqL must be None, a list of ints or a 1-D integer "
                        f"tensor, got {type(seqL).__name__}")
    if len(seqL) == 0:
        raise ValueError(f"qgait::{op}: seqL must not be empty")
    if x.shape[0] != 1:
        raise ValueError(f"qgait::{op}: with seqL the sequences are packed along T, so N must "
                         f"be 1, got N={x.shape[0]}")
    if any(v <= 0 for v in seqL):
        raise ValueError(f"qgait::{op}: every sequence length in seqL must be > 0, got {seqL}")
    if sum(seqL) != x.shape[2]:
        raise ValueError(f"qgait::{op}: seqL sums to {sum(seqL)} but x has T={x.shape[2]} "
                         "frames")
    return seqL


def _check_bins(op, bins, H) -> list[int]:
    if isinstance(bins, int) and not isinstance(bins, bool):
        bins = [bins]
    if not isinstance(bins, (list, tuple)) or len(bins) == 0:
        raise ValueError(f"qgait::{op}: bins must be a non-empty sequence of ints > 0, "
                         f"got {bins!r}")
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bins):
        raise ValueError(f"qgait::{op}: every bin must be an int > 0, got {list(bins)}")
    if max(bins) > H:
        raise ValueError(f"qgait::{op}: H={H} is smaller than the largest bin {max(bins)} "
                         "(a strip would have no rows)")
    return list(bins)


def _check_mode(op, mode) -> int:
    if mode not in MODES:
        raise ValueError(f"qgait::{op}: mode must be one of {list(MODES)}, got {mode!r}")
    return MODES[mode]


def _select(op, x, backend, hpp=True, bins=(), n_seq=0):
    b = _backend.select(op, _BACKENDS, backend, x.device.type == "cpu", x, hpp, bins, n_seq)
    return b.run


def temporal_pool(x: torch.Tensor, seqL=None, backend: str | None = None) -> torch.Tensor:
    """Max over frames (set pooling), per packed sequence when ``seqL`` is given.

    Args:
        x: ``[N, C, T, H, W]``, float32 / float16 / bfloat16.
        seqL: None, or per-sequence frame counts (list of ints or a 1-D integer tensor) of the
            sequences packed along T; then N must be 1 and ``sum(seqL) == T``.
        backend: "auto" (default, or ``QGAIT_BACKEND``), "cpu", "cuda", "triton", "reference".

    Returns:
        ``[N, C, H, W]``, or ``[len(seqL), C, H, W]`` with ``seqL``; x's dtype.

    Example:
        >>> z = temporal_pool(torch.randn(1, 64, 30, 16, 11), seqL=[10, 20])  # [2, 64, 16, 11]
    """
    _check_x(OP_TP, x, 5)
    s = _check_seqL(OP_TP, x, seqL)
    return _select(OP_TP, x, backend, False, (), len(s)).tp(x, s)


def horizontal_pyramid_pool(x: torch.Tensor, bins: Sequence[int] = DEFAULT_BINS,
                            mode: str = "mean+max", backend: str | None = None) -> torch.Tensor:
    """Horizontal pyramid pooling: mean + max of each horizontal strip at several scales.

    Args:
        x: ``[N, C, H, W]``, float32 / float16 / bfloat16; ``H >= max(bins)``.
        bins: strips per level, e.g. ``(16, 8, 4, 2, 1)``; strip boundaries as in the module
            docstring (OpenGait's equal strips when ``b`` divides H).
        mode: "mean+max" (OpenGait), "max" or "mean".
        backend: as in :func:`temporal_pool`.

    Returns:
        ``[N, C, sum(bins)]``, levels concatenated in the order of ``bins``; x's dtype.

    Example:
        >>> f = horizontal_pyramid_pool(torch.randn(8, 128, 16, 11), bins=(16,))  # [8, 128, 16]
    """
    _check_x(OP_HPP, x, 4)
    b = _check_bins(OP_HPP, bins, x.shape[2])
    m = _check_mode(OP_HPP, mode)
    x5 = x.unsqueeze(2)  # one frame: the backends' limits are stated for [N, C, T, H, W]
    return _select(OP_HPP, x5, backend, True, b).sph(x5, [], b, m)


def set_pool_hpp(x: torch.Tensor, seqL=None, bins: Sequence[int] = DEFAULT_BINS,
                 mode: str = "mean+max", backend: str | None = None) -> torch.Tensor:
    """Temporal max pooling then horizontal pyramid pooling, fused: reads ``x`` once and never
    materialises the ``[N, C, H, W]`` intermediate in the forward.

    Equal to ``horizontal_pyramid_pool(temporal_pool(x, seqL), bins, mode)``, gradients included.

    Args:
        x: ``[N, C, T, H, W]``, float32 / float16 / bfloat16; ``H >= max(bins)``.
        seqL: as in :func:`temporal_pool`.
        bins, mode: as in :func:`horizontal_pyramid_pool`.
        backend: as in :func:`temporal_pool`.

    Returns:
        ``[N or len(seqL), C, sum(bins)]``; x's dtype.

    Example:
        >>> feat = set_pool_hpp(torch.randn(4, 128, 30, 16, 11))  # [4, 128, 31]
    """
    _check_x(OP_SPH, x, 5)
    s = _check_seqL(OP_SPH, x, seqL)
    b = _check_bins(OP_SPH, bins, x.shape[3])
    m = _check_mode(OP_SPH, mode)
    return _select(OP_SPH, x, backend, True, b, len(s)).sph(x, s, b, m)

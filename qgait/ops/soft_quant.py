r"""QGait's soft fake-quantizer: hard rounding forward, tanh-shaped surrogate gradient backward.

The math (this is qgait's specification; the paper gives no formula):

Inputs: ``x`` (float32 / float16 / bfloat16; the math is fp32), a step ``s > 0`` (fp32, one per
tensor or one per channel along ``axis``), a grid ``[qn, qp]`` (``bits`` in 2..8; signed:
``qn = -2^(b-1), qp = 2^(b-1) - 1``; unsigned: ``qn = 0, qp = 2^b - 1``), a temperature
``k >= 0``, a forward mode ``"hard"`` or ``"soft"`` and a step-gradient scale ``gamma``
(default ``1 / sqrt(n * qp)`` with ``n`` the number of elements sharing one step, as in LSQ).

* ``v = x * r`` with ``r = 1/s`` rounded to fp32 once per step (as torch's fake-quant ops do,
  so that hard results match theirs bit for bit); ``c = clamp(v, qn, qp)``; ``f = c - floor(c)``.
* hard forward: ``y = round_half_to_even(c) * s``.
* soft forward: ``y = sigma(c) * s``,
  ``sigma(c) = floor(c) + 1/2 + tanh(k (f - 1/2)) / (2 tanh(k/2))`` (``sigma(c) = c`` at ``k = 0``).
* surrogate derivative ``g(c) = (k/2) / tanh(k/2) * (1 - tanh^2(k (f - 1/2)))``, ``g = 1`` at
  ``k = 0`` (the straight-through estimator). Its mean over one step is exactly 1 for every k,
  and it is the true derivative of ``sigma``, so soft mode's gradients are exact gradients.
* ``dL/dx = dL/dy * g(c)`` where ``qn <= v <= qp``, else 0.
* ``dL/ds = gamma * sum over the step's elements of`` ``dL/dy * (q(c) - v g(c))`` inside,
  ``dL/dy * qn`` below, ``dL/dy * qp`` above; ``q = round(c)`` (hard) or ``sigma(c)`` (soft).

``k = 0`` is QGait's stage 1 (straight-through / LSQ); ``k > 0`` is stage 2 (soft).
A NaN in ``x`` gives NaN in ``y`` (and in the gradients); a step ``<= 0`` or non-finite is an
error (checked on the CPU; on a GPU by a device-side assert in the CUDA and Triton kernels, so
that no call syncs the host).

Backends: ``reference`` (pure PyTorch, the truth), ``cpu`` (C++, AVX-512 / AVX2 / scalar),
``cuda`` (CUDA C++), ``triton``. See :mod:`qgait._backend` for how one is chosen.
"""
from __future__ import annotations

import math
import weakref

import torch

from qgait import _backend, _ext

OP = "soft_fake_quant"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def quant_grid(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid ``(qn, qp)`` of a ``bits``-bit quantizer."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"qgait::{OP}: bits must be an integer in 2..8, got {bits!r}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def default_gamma(x_numel: int, n_steps: int, qp: int) -> float:
    """LSQ's step-gradient scale ``1 / sqrt(n * qp)``, n = elements per step."""
    n = max(1, x_numel // max(1, n_steps))
    return 1.0 / math.sqrt(n * qp)


def _tanh_consts(k: float) -> tuple[float, float]:
    """(1 / (2 tanh(k/2)), (k/2) / tanh(k/2)) for k > 0 (series near 0, as in the kernels)."""
    th = math.tanh(k / 2.0)
    g_scale = 1.0 + k * k / 12.0 if k < 1e-3 else (k / 2.0) / th
    return 0.5 / th, g_scale


# ---------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the truth every backend is tested against.
# ---------------------------------------------------------------------------------------------
def _step_view(scale: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if axis < 0:
        return scale.reshape(())
    return scale.reshape([-1] + [1] * (x.dim() - axis - 1))


def _ref_parts(x, scale, axis, qn, qp, k, soft):
    """Returns (v, c, g, q, s) of the math above, in fp32 (fp64 for fp64 inputs)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = _step_view(scale, x, axis).to(cdt)
    r = 1.0 / s  # rounded once per step, in the compute dtype
    v = x.to(cdt) * r
    c = torch.clamp(v, qn, qp)
    if k == 0.0:
        g = torch.ones_like(c)
        sig = c
    else:
        tanh_scale, g_scale = _tanh_consts(k)
        fl = torch.floor(c)
        t = torch.tanh(k * (c - fl - 0.5))
        g = g_scale * (1.0 - t * t)
        sig = fl + 0.5 + t * tanh_scale
    q = sig if soft else torch.round(c)  # torch.round is half-to-even
    return v, c, g, q, s


def soft_fake_quant_ref(x, scale, axis=-1, qn=-128, qp=127, k=0.0, soft=False):
    """Reference forward: ``y = q(c) * s`` in x's dtype."""
    v, c, g, q, s = _ref_parts(x, scale, axis, qn, qp, k, soft)
    return (q * s + 0.0).to(x.dtype)  # + 0: -0 -> +0, bit-identical to torch


def soft_fake_quant_backward_ref(grad_y, x, scale, axis=-1, qn=-128, qp=127, k=0.0, soft=False,
                                 gamma=1.0):
    """Reference backward: ``(dL/dx, dL/ds)`` of the math above."""
    v, c, g, q, s = _ref_parts(x, scale, axis, qn, qp, k, soft)
    gy = grad_y.to(v.dtype)
    below, above = v < qn, v > qp
    outside = below | above
    dx = torch.where(outside, torch.zeros_like(gy), gy * g).to(x.dtype)
    term = gy * torch.where(below, torch.full_like(v, qn),
                            torch.where(above, torch.full_like(v, qp), q - v * g))
    if axis < 0:
        ds = term.sum()
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        ds = term.sum(dim=dims) if dims else term
    ds = (ds * gamma).to(scale.dtype).reshape(scale.shape)
    return dx, ds


class _SoftFakeQuantRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, axis, qn, qp, k, soft, gamma):
        ctx.save_for_backward(x, scale)
        ctx.args = (axis, qn, qp, k, soft, gamma)
        return soft_fake_quant_ref(x, scale, axis, qn, qp, k, soft)

    @staticmethod
    def backward(ctx, grad_y):
        x, scale = ctx.saved_tensors
        dx, ds = soft_fake_quant_backward_ref(grad_y, x, scale, *ctx.args)
        return (dx if ctx.needs_input_grad[0] else None,
                ds if ctx.needs_input_grad[1] else None) + (None,) * 6


# ---------------------------------------------------------------------------------------------
# The C++ op (CPU and CUDA kernels in csrc/): fake impls and autograd.
# ---------------------------------------------------------------------------------------------
def _fake_forward(x, scale, axis, qn, qp, k, soft, gamma):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad_y, x, scale, axis, qn, qp, k, soft, gamma, need_dx, need_ds):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    ds = torch.empty_like(scale) if need_ds else scale.new_empty(0)
    return dx, ds


def _setup_context(ctx, inputs, output):
    x, scale, axis, qn, qp, k, soft, gamma = inputs
    ctx.save_for_backward(x, scale)
    ctx.args = (axis, qn, qp, k, soft, gamma)


def _make_backward(backward_op):
    def backward(ctx, grad_y):
        x, scale = ctx.saved_tensors
        need_dx, need_ds = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, ds = backward_op(grad_y.contiguous(), x, scale, *ctx.args, need_dx, need_ds)
        return (dx if need_dx else None, ds if need_ds else None) + (None,) * 6

    return backward


if _ext.HAS_C:
    torch.library.register_fake(f"qgait::{OP}")(_fake_forward)
    torch.library.register_fake(f"qgait::{OP}_backward")(_fake_backward)
    torch.library.register_autograd(
        f"qgait::{OP}",
        _make_backward(lambda *a: torch.ops.qgait.soft_fake_quant_backward(*a)),
        setup_context=_setup_context,
    )

# ---------------------------------------------------------------------------------------------
# Triton (kernels/soft_quant.py), registered with torch.library.triton_op.
# ---------------------------------------------------------------------------------------------
_TRITON_OK, _TRITON_WHY = _ext.triton_status()
if _TRITON_OK:
    from qgait.kernels import soft_quant as _tk

    @torch.library.triton_op(f"qgait::{OP}_triton", mutates_args=())
    def _sfq_triton(x: torch.Tensor, scale: torch.Tensor, axis: int, qn: int, qp: int, k: float,
                    soft: bool, gamma: float) -> torch.Tensor:
        return _tk.forward(x, scale, axis, qn, qp, k, soft)

    @torch.library.triton_op(f"qgait::{OP}_triton_backward", mutates_args=())
    def _sfq_triton_bwd(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, axis: int,
                        qn: int, qp: int, k: float, soft: bool, gamma: float, need_dx: bool,
                        need_ds: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.backward(grad_y, x, scale, axis, qn, qp, k, soft, gamma, need_dx, need_ds)

    # Explicit fake impls: triton_op would otherwise trace the launcher with fake tensors,
    # which Triton's CPU interpreter cannot run.
    _sfq_triton.register_fake(_fake_forward)
    _sfq_triton_bwd.register_fake(_fake_backward)
    torch.library.register_autograd(
        f"qgait::{OP}_triton",
        _make_backward(lambda *a: torch.ops.qgait.soft_fake_quant_triton_backward(*a)),
        setup_context=_setup_context,
    )


# ---------------------------------------------------------------------------------------------
# Backends and the public function.
# ---------------------------------------------------------------------------------------------
# Looked up once: the dispatcher's registrations do not change after import, and keeping the
# query out of the call path lets torch.compile trace through backend selection.
_HAS_CPU = _ext.has_kernel(OP, "CPU")
_HAS_CUDA = _ext.has_kernel(OP, "CUDA")


def _why_not_reference(x, scale):
    return []


def _why_not_kernel(device: str, has_kernel: bool, x, scale):
    """Reasons the C++ kernels for ``device`` ("cpu" / "cuda") cannot take these inputs."""
    return (_backend.native_reasons(has_kernel, device, x) + _backend.float_reasons(x, _FLOATS)
            + _backend.float_reasons(scale, (torch.float32,), "scale"))


def _why_not_cpu(x, scale):
    return _why_not_kernel("cpu", _HAS_CPU, x, scale)


def _why_not_cuda(x, scale):
    return _why_not_kernel("cuda", _HAS_CUDA, x, scale)


def _why_not_triton(x, scale):
    return (_backend.triton_reasons((_TRITON_OK, _TRITON_WHY), x)
            + _backend.float_reasons(x, _FLOATS)
            + _backend.float_reasons(scale, (torch.float32,), "scale"))


def _run_ref(x, scale, axis, qn, qp, k, soft, gamma):
    return _SoftFakeQuantRef.apply(x, scale, axis, qn, qp, k, soft, gamma)


_BACKENDS = (
    _backend.Backend("cuda", _why_not_cuda, lambda *a: torch.ops.qgait.soft_fake_quant(*a)),
    _backend.Backend("triton", _why_not_triton,
                     lambda *a: torch.ops.qgait.soft_fake_quant_triton(*a), auto_on_cpu=False),
    _backend.Backend("cpu", _why_not_cpu, lambda *a: torch.ops.qgait.soft_fake_quant(*a)),
    _backend.Backend("reference", _why_not_reference, _run_ref),
)


def _check(x, scale, bits, axis, k, mode):
    if not isinstance(x, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise TypeError(f"qgait::{OP}: x and scale must be tensors, got "
                        f"{type(x).__name__} and {type(scale).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"qgait::{OP}: x must be a floating-point tensor "
                        f"(float32/float16/bfloat16), got {x.dtype}")
    if not scale.is_floating_point():
        raise TypeError(f"qgait::{OP}: scale must be a float32 tensor, got {scale.dtype}")
    if x.device != scale.device:
        raise ValueError(f"qgait::{OP}: x is on {x.device} but scale is on {scale.device}; "
                         "move them to the same device")
    if mode not in ("hard", "soft"):
        raise ValueError(f"qgait::{OP}: mode must be 'hard' or 'soft', got {mode!r}")
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not math.isfinite(k) or k < 0:
        raise ValueError(f"qgait::{OP}: temperature k must be a finite number >= 0, got {k!r}")
    if axis is None:
        if scale.numel() != 1:
            raise ValueError(f"qgait::{OP}: per-tensor quantization (axis=None) needs a scale "
                             f"with one element, got shape {tuple(scale.shape)}")
        return -1
    if not isinstance(axis, int) or not -x.dim() <= axis < max(x.dim(), 1):
        raise ValueError(f"qgait::{OP}: axis {axis!r} is out of range for x with {x.dim()} dims")
    axis = axis % x.dim()
    if scale.dim() != 1 or scale.shape[0] != x.shape[axis]:
        raise ValueError(f"qgait::{OP}: per-channel scale must have shape [{x.shape[axis]}] "
                         f"(x.shape[{axis}]), got {tuple(scale.shape)}")
    return axis


def check_step_values(s: torch.Tensor, name: str = "scale", op: str = OP) -> None:
    """Raises one clear ValueError unless every value of the step tensor ``s`` is finite and
    > 0 (``op``, ``name``: how the message names it).

    Only where it costs no device sync (the CUDA and Triton kernels assert on the device), and
    once per tensor version: a model's steps are checked on its first call and again only after
    they change (in place, by load_state_dict or an optimizer step). In the packed
    GaitLite3D (whose convolutions keep their checked arguments) one remains per sequence:
    soft_fake_quant of the part FCs' input [1, 128, 31] took 47 us per call with the check,
    23 us without it (1 thread, AMD EPYC family 25)."""
    if s.device.type != "cpu" or torch.compiler.is_compiling():
        return
    version = None if s.is_inference() else s._version  # inference tensors have none
    seen = _CHECKED.get(id(s))
    if version is not None and seen is not None and seen[0]() is s and seen[1] == version:
        return
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        raise ValueError(f"qgait::{op}: {name} must be finite and > 0, got "
                         f"{s[bad].flatten()[:4].tolist()}")
    if version is not None:
        if len(_CHECKED) > 4096:
            _CHECKED.clear()
        _CHECKED[id(s)] = (weakref.ref(s), version)


# id(tensor) -> (weak reference, version) of the step tensors found valid: the weak reference
# tells a live tensor from a later one at a reused id, and any in-place write bumps the version
_CHECKED: dict = {}


def soft_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int = 8, signed: bool = True,
                    axis: int | None = None, k: float = 0.0, mode: str = "hard",
                    gamma: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Fake-quantizes ``x`` with QGait's soft quantizer (math in the module docstring).

    Args:
        x: any shape, float32 / float16 / bfloat16 (float64 on the reference backend).
        scale: the step, fp32: shape ``[]`` / ``[1]`` (per tensor, ``axis=None``) or
            ``[x.shape[axis]]`` (per channel). Differentiable (learned step size).
        bits: 2..8. signed: grid ``[-2^(b-1), 2^(b-1)-1]``, else ``[0, 2^b-1]``.
        axis: None for per-tensor, else the channel axis of ``scale``.
        k: temperature >= 0 (0 = straight-through, stage 1; > 0 = soft, stage 2).
        mode: "hard" (round forward) or "soft" (``sigma(c)`` forward).
        gamma: step-gradient scale; default ``1/sqrt(n*qp)`` (LSQ), n = elements per step.
        backend: "auto" (default, or ``QGAIT_BACKEND``), "cpu", "cuda", "triton", "reference".

    Returns:
        ``y``, same shape and dtype as ``x`` (contiguous).

    Example:
        >>> y = soft_fake_quant(x, torch.tensor(0.05), bits=4, signed=False, k=4.0)
    """
    ax = _check(x, scale, bits, axis, k, mode)
    qn, qp = quant_grid(bits, signed)
    check_step_values(scale)
    if gamma is None:
        gamma = default_gamma(x.numel(), 1 if ax < 0 else scale.numel(), qp)
    impl = _backend.select(OP, _BACKENDS, backend, x.device.type == "cpu", x, scale)
    if ax < 0 and impl.name != "reference":
        scale = scale.reshape(())
    return impl.run(x, scale, ax, qn, qp, float(k), mode == "soft", float(gamma))

"""Drop-in quantized layers: ``SoftQuantConv3d`` (for ``nn.Conv3d``), ``SoftQuantConv2d``,
``SoftQuantLinear``.

Each layer fake-quantizes its weight (per output channel, signed grid) and its input
(per tensor; unsigned grid when the first batch it sees is non-negative, e.g. after a ReLU,
signed otherwise) with :func:`qgait.ops.soft_fake_quant`, then runs the float op. Steps are
learned (LSQ) and initialised from the first batch: weights with LSQ's ``2 mean|w| / sqrt(qp)``
(``w_init="lsq"``, the default) or per channel with the step of least squared rounding error
(``w_init="mse"``: at 6-8 bits LSQ's rule uses a fraction of the grid, see
:func:`mse_weight_init`), activations with a search for the step that minimises the
quantization MSE (``a_init="mse"``, the default), with the batch's largest magnitude, no
clipping (``a_init="max"``), or with its 99.995th percentile of magnitudes (``a_init="pct"``:
at 8 bits the MSE step clips what later layers need, see :func:`percentile_act_init`).
``a_bits=None`` leaves the input untouched (a binary silhouette needs no quantizer).

``k`` and ``mode`` select QGait's stage: ``k=0`` is the straight-through estimator (stage 1),
``k>0`` the soft quantizer's tanh-shaped gradient (stage 2); ``mode="soft"`` also uses the
smooth ``sigma(c)`` in the forward. Switch them for a whole model with
:func:`qgait.set_quant_mode`.

Example:
    >>> conv = SoftQuantConv3d(1, 32, 3, padding=1, w_bits=4, a_bits=None)
    >>> y = conv(torch.rand(2, 1, 30, 64, 44).round())
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qgait.ops.soft_quant import quant_grid, soft_fake_quant

_MODES = ("hard", "soft")
_MIN_STEP = 1e-8


ACT_PERCENTILE = 99.995   # a_init="pct": chosen on training subjects (percentile_act_init)


def _check_quant_args(name, w_bits, a_bits, k, mode, w_init="lsq", a_init="mse"):
    quant_grid(w_bits, True)
    if w_init not in W_INITS:
        raise ValueError(f"{name}: w_init must be 'lsq' or 'mse', got {w_init!r}")
    if a_init not in A_INITS:
        raise ValueError(f"{name}: a_init must be one of {A_INITS}, got {a_init!r}")
    if a_bits is not None:
        quant_grid(a_bits, False)
    if not isinstance(k, (int, float)) or isinstance(k, bool) or k < 0:
        raise ValueError(f"{name}: k must be a number >= 0, got {k!r}")
    if mode not in _MODES:
        raise ValueError(f"{name}: mode must be 'hard' or 'soft', got {mode!r}")


@torch.no_grad()
def lsq_weight_init(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel LSQ step ``2 mean|w| / sqrt(qp)`` (signed grid), shape [C_out]."""
    _, qp = quant_grid(bits, True)
    m = w.detach().float().abs().reshape(w.shape[0], -1).mean(dim=1)
    return (2.0 * m / qp**0.5).clamp_min(1e-8)


@torch.no_grad()
def mse_weight_init(w: torch.Tensor, bits: int, n_grid: int = 64) -> torch.Tensor:
    """Per-output-channel step minimising ``||fq(w_c) - w_c||^2`` (signed grid), shape [C_out].

    Candidates are ``s = alpha * max|w_c| / qp`` for alpha in (0, 1], per row independently;
    ties keep the smallest alpha. At 8 bits LSQ's ``2 mean|w| / sqrt(qp)`` (lsq_weight_init)
    reaches only ``~22 mean|w|``, a fraction of the grid for weights whose largest is a few
    mean magnitudes; this step spans the row's range when rounding dominates the error.
    """
    qn, qp = quant_grid(bits, True)
    rows = w.detach().float().reshape(w.shape[0], -1)
    amax = rows.abs().amax(dim=1).clamp_min(1e-8)
    best, best_err = amax / qp, torch.full_like(amax, float("inf"))
    for a in torch.linspace(1.0 / n_grid, 1.0, n_grid).tolist():
        step = a * amax / qp
        err = (torch.clamp(torch.round(rows / step[:, None]), qn, qp) * step[:, None]
               - rows).pow(2).sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, step, best), torch.where(better, err, best_err)
    return best


def _flat_sample(x: torch.Tensor, max_samples: int) -> torch.Tensor:
    """``x`` flattened to float, every k-th element when it has more than ``max_samples``."""
    flat = x.detach().float().reshape(-1)
    return flat[:: flat.numel() // max_samples + 1] if flat.numel() > max_samples else flat


@torch.no_grad()
def mse_act_init(x: torch.Tensor, bits: int, signed: bool, n_grid: int = 64,
                 max_samples: int = 1 << 20) -> torch.Tensor:
    """Per-tensor step minimising ``||fq(x) - x||^2`` over ``n_grid`` clipping ratios.

    Candidates are ``s = alpha * max|x| / qp`` for alpha in (0, 1]; a fixed-stride subsample of
    at most ``max_samples`` elements keeps it cheap on large activations.
    """
    qn, qp = quant_grid(bits, signed)
    flat = _flat_sample(x, max_samples)
    amax = flat.abs().max().clamp_min(1e-8)
    alphas = torch.linspace(1.0 / n_grid, 1.0, n_grid, device=flat.device)
    steps = alphas * amax / qp
    best, best_err = steps[-1], None
    for s in steps:
        q = torch.clamp(torch.round(flat / s), qn, qp) * s
        err = (q - flat).pow(2).sum()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best.reshape(())


@torch.no_grad()
def max_act_init(x: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Per-tensor step ``max|x| / qp``: the grid spans the batch's range, nothing is clipped."""
    _, qp = quant_grid(bits, signed)
    return (x.detach().float().abs().max().clamp_min(1e-8) / qp).reshape(())


@torch.no_grad()
def percentile_act_init(x: torch.Tensor, bits: int, signed: bool, q: float | None = None,
                        max_samples: int = 1 << 22) -> torch.Tensor:
    """Per-tensor step ``P_q(|x|) / qp``: the values above the q-th percentile of magnitudes
    are clipped (a fixed-stride subsample of at most ``max_samples`` elements); ``q=None`` reads
    the module's ``ACT_PERCENTILE`` at call time (what ``a_init="pct"`` uses).

    At 8 bits the MSE step (:func:`mse_act_init`) clips far more: it trades the largest
    activations for a finer grid, and on GaitLite3D's LeakyReLU inputs those moved the
    embeddings more than the rounding it saves; ``max|x|`` (:func:`max_act_init`) wastes range
    on single outliers. The default q was chosen between them by the embeddings' distance to
    the fp model's on training subjects (docs/results.md). At 2-4 bits clipping pays and the
    MSE step is the better rule.
    """
    q = ACT_PERCENTILE if q is None else q
    if not 0.0 < q <= 100.0:
        raise ValueError(f"percentile_act_init: q must be in (0, 100], got {q!r}")
    _, qp = quant_grid(bits, signed)
    flat = _flat_sample(x, max_samples).abs()
    return (torch.quantile(flat, q / 100.0).clamp_min(1e-8) / qp).reshape(())


# The step rules by name (QuantConfig's w_init / a_init)
_W_RULES = {"lsq": lsq_weight_init, "mse": mse_weight_init}
_A_RULES = {"mse": mse_act_init, "max": max_act_init, "pct": percentile_act_init}
W_INITS, A_INITS = tuple(_W_RULES), tuple(_A_RULES)


class _SoftQuantMixin:
    """State and behaviour shared by the quantized layers."""

    # a_init="pct": this layer's percentile; None = the module's ACT_PERCENTILE (a sweep, e.g.
    # tools/ptq_eval.py --a-percentile, sets it per layer before the first forward)
    a_percentile: float | None = None

    def _setup_quant(self, out_channels, w_bits, a_bits, k, mode, w_init="lsq", a_init="mse"):
        _check_quant_args(type(self).__name__, w_bits, a_bits, k, mode, w_init, a_init)
        self.w_bits, self.a_bits, self.k, self.mode = int(w_bits), a_bits, float(k), mode
        self.w_init = w_init  # how init_steps sets the weight steps: lsq_weight_init / mse_...
        self.a_init = a_init  # and the activation step: mse_ / max_ / percentile_act_init
        self.w_scale = nn.Parameter(torch.ones(out_channels))
        self.a_scale = nn.Parameter(torch.ones(()))
        # Activations use the signed grid when the first batch had negative values. Kept as a
        # Python bool (so torch.compile sees a constant) mirrored in a buffer for exporters.
        self._a_signed = False
        self.register_buffer("a_signed_flag", torch.zeros((), dtype=torch.uint8))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.backend = None  # None = auto (QGAIT_BACKEND or the best available)

    @property
    def a_signed(self) -> bool:
        return self._a_signed

    def weight_rows(self) -> torch.Tensor:
        """The weight as quantized: one step per row (dim 0)."""
        return self.weight

    @torch.no_grad()
    def init_steps(self, x: torch.Tensor) -> None:
        """Initialises the steps from a batch (done automatically by the first forward).

        Under torch.distributed every rank sees its own batch: the activation step and grid
        are agreed across ranks (mean step, signed if any rank saw negatives) so that the
        replicas stay identical.
        """
        # (getattr: a layer unpickled from an older qgait has no w_init / a_init)
        a_init = _A_RULES[getattr(self, "a_init", "mse")]
        self.w_scale.copy_(_W_RULES[getattr(self, "w_init", "lsq")](self.weight_rows(),
                                                                    self.w_bits))
        if self.a_bits is not None:
            neg = (x.detach().min() < 0).float().reshape(1)
            dist = torch.distributed
            ddp = dist.is_available() and dist.is_initialized()
            if ddp:
                dist.all_reduce(neg, op=dist.ReduceOp.MAX)
            signed = bool(neg.item() > 0)
            self._a_signed = signed
            self.a_signed_flag.fill_(int(signed))
            kw = {"q": self.a_percentile} if a_init is percentile_act_init else {}
            self.a_scale.copy_(a_init(x, self.a_bits, signed, **kw))
            if ddp:
                dist.all_reduce(self.a_scale.data)
                self.a_scale.data /= dist.get_world_size()
        self.initialized.fill_(True)

    def quantized_weight(self) -> torch.Tensor:
        return soft_fake_quant(self.weight_rows(), self.w_scale, bits=self.w_bits, signed=True,
                               axis=0, k=self.k, mode=self.mode, backend=self.backend)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits is None:
            return x
        return soft_fake_quant(x, self.a_scale, bits=self.a_bits, signed=self.a_signed,
                               axis=None, k=self.k, mode=self.mode, backend=self.backend)

    def _prepare(self, x):
        if torch.compiler.is_compiling():
            return
        if not bool(self.initialized):
            self.init_steps(x)
        elif self.training:
            # Keep learned steps positive (a projection after the optimizer's update): an
            # update can overshoot zero, and a step <= 0 is an error in the quantizer.
            with torch.no_grad():
                self.w_scale.clamp_(min=_MIN_STEP)
                self.a_scale.clamp_(min=_MIN_STEP)

    def get_extra_state(self):
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "k": self.k, "mode": self.mode,
                "a_signed": self._a_signed}

    def set_extra_state(self, state):
        if state["w_bits"] != self.w_bits or state["a_bits"] != self.a_bits:
            raise ValueError(
                f"{type(self).__name__}: checkpoint was saved with w_bits={state['w_bits']}, "
                f"a_bits={state['a_bits']} but this layer has w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}")
        self.k, self.mode = float(state["k"]), state["mode"]
        self._a_signed = bool(state.get("a_signed", False))

    def extra_repr(self):
        return (super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"k={self.k}, mode={self.mode}")


class _SoftQuantConvNd(_SoftQuantMixin):
    """Constructor, forward and float round trips shared by the quantized convolutions; a
    subclass names its float counterpart in ``_FLOAT``."""

    _FLOAT: type = nn.Conv3d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 w_bits=8, a_bits=8, k=0.0, mode="hard", w_init="lsq", a_init="mse"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self._setup_quant(out_channels, w_bits, a_bits, k, mode, w_init, a_init)

    def forward(self, x):
        self._prepare(x)
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, conv, **quant):
        """A quantized layer with ``conv``'s hyper-parameters and a copy of its weights."""
        if not isinstance(conv, cls._FLOAT):
            raise TypeError(f"{cls.__name__}.from_float: expected nn.{cls._FLOAT.__name__}, "
                            f"got {type(conv)}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype, **quant)
        _copy_params(conv, q)
        return q

    def to_float(self):
        """The plain float convolution with this layer's (unquantized) weights."""
        c = self._FLOAT(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                        self.padding, self.dilation, self.groups, self.bias is not None,
                        self.padding_mode, device=self.weight.device, dtype=self.weight.dtype)
        _copy_params(self, c)
        return c


class SoftQuantConv3d(_SoftQuantConvNd, nn.Conv3d):
    """``nn.Conv3d`` with QGait soft fake-quantization of weights and input.

    Same constructor and forward as ``nn.Conv3d``, plus ``w_bits`` (2..8), ``a_bits`` (2..8 or
    None for an unquantized input), ``k`` (temperature >= 0) and ``mode`` ("hard" | "soft").
    Input [N, C_in, T, H, W] -> [N, C_out, T', H', W'].
    """

    _FLOAT = nn.Conv3d


class SoftQuantConv2d(_SoftQuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` counterpart of :class:`SoftQuantConv3d`."""

    _FLOAT = nn.Conv2d


class SoftQuantLinear(_SoftQuantMixin, nn.Linear):
    """``nn.Linear`` counterpart: weight [out, in] quantized per output row."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 w_bits=8, a_bits=8, k=0.0, mode="hard", w_init="lsq", a_init="mse"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._setup_quant(out_features, w_bits, a_bits, k, mode, w_init, a_init)

    def forward(self, x):
        self._prepare(x)
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, lin: nn.Linear, **quant):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"SoftQuantLinear.from_float: expected nn.Linear, got {type(lin)}")
        q = cls(lin.in_features, lin.out_features, lin.bias is not None,
                device=lin.weight.device, dtype=lin.weight.dtype, **quant)
        _copy_params(lin, q)
        return q


def part_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-part linear maps: ``x`` [N, Cin, P] by ``w`` [P, Cin, Cout] -> [N, Cout, P].

    The permuted input is made contiguous first: bmm on the strided view copied it batch by
    batch (95 against 18 us for one 31-part sequence, 64 channels, 1 thread). GaitLite3D's
    SeparateFCs, the fake-quant and the packed part FCs all multiply here, so all three alike.
    """
    return torch.bmm(x.permute(2, 0, 1).contiguous(), w.to(x.dtype)).permute(1, 2, 0)


class SoftQuantPartLinear(_SoftQuantMixin, nn.Module):
    """Per-part linear maps (OpenGait's SeparateFCs): ``[N, C_in, P] -> [N, C_out, P]`` with
    ``weight [P, C_in, C_out]``, quantized per (part, output channel) on the signed grid and
    with a per-tensor input step.
    """

    def __init__(self, parts, in_channels, out_channels, device=None, dtype=None, *,
                 w_bits=8, a_bits=8, k=0.0, mode="hard", w_init="lsq", a_init="mse"):
        super().__init__()
        self.parts, self.in_channels, self.out_channels = parts, in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(parts, in_channels, out_channels, device=device,
                                               dtype=dtype))
        nn.init.xavier_uniform_(self.weight)
        self.bias = None
        self._setup_quant(parts * out_channels, w_bits, a_bits, k, mode, w_init, a_init)

    def weight_rows(self):
        # [P, Cin, Cout] -> [P * Cout, Cin]: one row (and one step) per part and output channel
        return self.weight.permute(0, 2, 1).reshape(self.parts * self.out_channels,
                                                    self.in_channels)

    def quantized_weight(self):
        wq = super().quantized_weight()
        return wq.reshape(self.parts, self.out_channels, self.in_channels).permute(0, 2, 1)

    def forward(self, x):
        self._prepare(x)
        xq = self.quantized_input(x)
        return part_matmul(xq, self.quantized_weight())

    @classmethod
    def from_float(cls, fc: nn.Module, **quant):
        """From any module with ``weight [P, C_in, C_out]`` (e.g. qgait.models.SeparateFCs)."""
        w = getattr(fc, "weight", None)
        if w is None or w.dim() != 3:
            raise TypeError(f"SoftQuantPartLinear.from_float: expected a module with a "
                            f"weight [P, C_in, C_out], got {type(fc).__name__}")
        q = cls(w.shape[0], w.shape[1], w.shape[2], device=w.device, dtype=w.dtype, **quant)
        with torch.no_grad():
            q.weight.copy_(w)
        return q

    def extra_repr(self):
        return (f"parts={self.parts}, in={self.in_channels}, out={self.out_channels}, "
                f"w_bits={self.w_bits}, a_bits={self.a_bits}, k={self.k}, mode={self.mode}")


def _copy_params(src, dst):
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)


SOFT_QUANT_MODULES = (SoftQuantConv3d, SoftQuantConv2d, SoftQuantLinear, SoftQuantPartLinear)

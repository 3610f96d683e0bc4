"""``quantize_`` / ``set_quant_mode``: turn a float model into a QGait fake-quant model in place.

    >>> qgait.quantize_(model, QuantConfig(w_bits=4, a_bits=4))        # stage 1 (k = 0)
    >>> qgait.set_quant_mode(model, k=4.0)                            # stage 2 (soft)

The same config object drives training (fake quant) and later ``qgait.quant.convert`` (packed
integer inference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from qgait.nn.soft_quant import (A_INITS, SOFT_QUANT_MODULES, W_INITS, SoftQuantConv2d,
                                 SoftQuantConv3d, SoftQuantLinear)

_SWAP = {nn.Conv3d: SoftQuantConv3d, nn.Conv2d: SoftQuantConv2d, nn.Linear: SoftQuantLinear}


def register_quantizable(float_cls: type, quant_cls: type) -> None:
    """Lets ``quantize_`` swap ``float_cls`` for ``quant_cls`` (which needs ``from_float``)."""
    if not hasattr(quant_cls, "from_float"):
        raise TypeError(f"register_quantizable: {quant_cls.__name__} has no from_float")
    _SWAP[float_cls] = quant_cls


@dataclass
class QuantConfig:
    """How to quantize the layers ``quantize_`` swaps.

    Attributes:
        w_bits: weight bits, 2..8 (per output channel, signed grid).
        a_bits: activation bits, 2..8 (per tensor), or None to leave inputs unquantized.
        k: temperature of the soft quantizer's gradient (0 = straight-through, stage 1).
        mode: "hard" (round in the forward) or "soft" (smooth sigma in the forward).
        w_init: how the first batch sets the weight steps: "lsq" (LSQ's ``2 mean|w| /
            sqrt(qp)``) or "mse" (per channel, least squared rounding error; better at 6-8
            bits, where LSQ's step leaves most of the grid unused).
        a_init: how the first batch sets the activation steps: "mse" (least squared error,
            clipping the largest values), "max" (the batch's largest magnitude, no clipping)
            or "pct" (its 99.995th percentile of magnitudes; the best of the three at 8 bits,
            where the MSE step clips more than it saves).
    """

    w_bits: int = 8
    a_bits: int | None = 8
    k: float = 0.0
    mode: str = "hard"
    w_init: str = "lsq"
    a_init: str = "mse"

    def __post_init__(self):
        if not isinstance(self.w_bits, int) or isinstance(self.w_bits, bool) \
                or not 2 <= self.w_bits <= 8:
            raise ValueError(f"QuantConfig: w_bits must be an integer in 2..8, got "
                             f"{self.w_bits!r} (use 8 for int8, 4 for int4)")
        if self.a_bits is not None and (not isinstance(self.a_bits, int)
                                        or isinstance(self.a_bits, bool)
                                        or not 2 <= self.a_bits <= 8):
            raise ValueError(f"QuantConfig: a_bits must be an integer in 2..8 or None "
                             f"(unquantized input), got {self.a_bits!r}")
        if not isinstance(self.k, (int, float)) or isinstance(self.k, bool) or self.k < 0:
            raise ValueError(f"QuantConfig: k must be a number >= 0 (0 = straight-through, "
                             f"stage 1), got {self.k!r}")
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"QuantConfig: mode must be 'hard' or 'soft', got {self.mode!r}")
        if self.w_init not in W_INITS:
            raise ValueError(f"QuantConfig: w_init must be 'lsq' or 'mse', got {self.w_init!r}")
        if self.a_init not in A_INITS:
            raise ValueError(f"QuantConfig: a_init must be one of {A_INITS}, got "
                             f"{self.a_init!r}")

    def kwargs(self) -> dict:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "k": float(self.k),
                "mode": self.mode, "w_init": self.w_init, "a_init": self.a_init}


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return type(module) in _SWAP


def quantize_(model: nn.Module, config: QuantConfig | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swaps, in place, every layer with ``filter_fn(module, fqn)`` true (default: every
    nn.Conv3d / nn.Conv2d / nn.Linear) for its SoftQuant counterpart with ``config``.

    Layers that are already SoftQuant layers are left alone (call ``quantize_`` once per
    config, most specific first, to give some layers other bits). Returns ``model``.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_: config must be a QuantConfig, got {type(config).__name__}")
    filter_fn = filter_fn or _default_filter

    def visit(parent: nn.Module, prefix: str):
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            if isinstance(child, SOFT_QUANT_MODULES):
                continue
            if type(child) in _SWAP and filter_fn(child, fqn):
                setattr(parent, name, _SWAP[type(child)].from_float(child, **config.kwargs()))
            else:
                visit(child, fqn)

    if type(model) in _SWAP:
        raise TypeError("quantize_: pass a model that contains the layer (quantize_ swaps "
                        "children in place), or use SoftQuantConv3d.from_float directly")
    visit(model, "")
    return model


def set_quant_mode(model: nn.Module, k: float | None = None, mode: str | None = None) -> int:
    """Sets ``k`` and/or ``mode`` on every SoftQuant layer of ``model`` (e.g. stage 1 -> 2).

    Returns the number of layers changed.
    """
    if k is not None and (not isinstance(k, (int, float)) or k < 0):
        raise ValueError(f"set_quant_mode: k must be a number >= 0, got {k!r}")
    if mode is not None and mode not in ("hard", "soft"):
        raise ValueError(f"set_quant_mode: mode must be 'hard' or 'soft', got {mode!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, SOFT_QUANT_MODULES):
            if k is not None:
                m.k = float(k)
            if mode is not None:
                m.mode = mode
            n += 1
    return n

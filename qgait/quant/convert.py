"""``convert``: a trained fake-quant model -> packed integer inference (:class:`PackedConv3d`).

    >>> qgait.quantize_(model, QuantConfig(w_bits=4, a_bits=8)); train(model)
    >>> qgait.quant.convert(model.eval())
    >>> model_nbytes(model)        # int4 weights: 1/8 of their fp32 bytes, plus the steps

Every ``SoftQuantConv3d`` becomes a ``PackedConv3d`` holding the hard-mode integers of its
learned steps. Inside an ``nn.Sequential`` a ``BatchNorm3d`` that directly follows it, and then a
``ReLU`` / ``LeakyReLU``, are folded into its epilogue (BatchNorm with its running statistics,
i.e. eval semantics) and replaced by ``nn.Identity``. With ``requantize=True`` a packed layer
whose next module (after those identities) is another packed layer with quantized input writes
that layer's int8 / uint8 codes directly, so a chain of convolutions stays integer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qgait.nn.soft_quant import SoftQuantConv3d

_ACTS = (nn.ReLU, nn.LeakyReLU)


def _packed_cls():
    # imported late: qgait.ops.packed_conv3d imports qgait.quant.packing (this package)
    from qgait.ops.packed_conv3d import PackedConv3d

    return PackedConv3d


def _convert_sequential(seq: nn.Sequential, requantize: bool) -> int:
    PackedConv3d = _packed_cls()
    names = list(seq._modules.keys())
    n = 0
    i = 0
    while i < len(names):
        mod = seq._modules[names[i]]
        if isinstance(mod, SoftQuantConv3d):
            bn = act = None
            j = i + 1
            if j < len(names) and isinstance(seq._modules[names[j]], nn.BatchNorm3d):
                bn, j = seq._modules[names[j]], j + 1
            if j < len(names) and isinstance(seq._modules[names[j]], _ACTS):
                act, j = seq._modules[names[j]], j + 1
            seq._modules[names[i]] = PackedConv3d.from_soft(mod, bn, act)
            for k in range(i + 1, j):
                seq._modules[names[k]] = nn.Identity()
            n += 1
            i = j
        else:
            n += _convert(mod, requantize)
            i += 1
    if requantize:
        chain = [m for m in seq if not isinstance(m, nn.Identity)]
        for a, b in zip(chain, chain[1:]):
            if isinstance(a, PackedConv3d) and isinstance(b, PackedConv3d) and b.a_bits:
                a.set_output_quant(b.a_scale, b.a_bits, b.a_signed)
    return n


def _convert(module: nn.Module, requantize: bool) -> int:
    PackedConv3d = _packed_cls()
    if isinstance(module, nn.Sequential):
        return _convert_sequential(module, requantize)
    n = 0
    for name, child in list(module._modules.items()):
        if isinstance(child, SoftQuantConv3d):
            module._modules[name] = PackedConv3d.from_soft(child)
            n += 1
        elif child is not None:
            n += _convert(child, requantize)
    return n


@torch.no_grad()
def convert(model: nn.Module, requantize: bool = True) -> nn.Module:
    """Replaces, in place, every ``SoftQuantConv3d`` of ``model`` by a ``PackedConv3d``.

    Args:
        model: a trained fake-quant model (steps initialised). BatchNorms are folded with their
            running statistics.
        requantize: let consecutive packed layers in one ``nn.Sequential`` pass int8 / uint8
            codes instead of fp32.
    Returns:
        ``model`` (converted in place, in eval mode). Its outputs equal the fake-quant model's
        (hard mode) up to fp32 rounding.
    """
    if isinstance(model, SoftQuantConv3d):
        raise TypeError("qgait.quant.convert: pass the model containing the layer; a bare "
                        "SoftQuantConv3d converts with PackedConv3d.from_soft(layer)")
    for m in model.modules():
        if isinstance(m, SoftQuantConv3d) and not bool(m.initialized):
            raise ValueError("qgait.quant.convert: a SoftQuantConv3d has uninitialised steps; "
                             "run a forward pass (or train) before converting")
    _convert(model, requantize)
    return model.eval()


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total

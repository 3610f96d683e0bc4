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

from qgait.nn.soft_quant import SoftQuantConv3d, SoftQuantPartLinear
from qgait.ops.soft_quant import soft_fake_quant
from qgait.quant.packing import pack_weight, quantize_weight, storage_bits, unpack_weight

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
        elif isinstance(mod, SoftQuantPartLinear):
            seq._modules[names[i]] = PackedPartLinear(mod)
            n += 1
            i += 1
        else:
            n += _convert(mod, requantize)
            i += 1
    if requantize:
        chain = [m for m in seq if not isinstance(m, nn.Identity)]
        for a, b in zip(chain, chain[1:]):
            if isinstance(a, PackedConv3d) and isinstance(b, PackedConv3d) and b.a_bits:
                a.set_output_quant(b.a_scale, b.a_bits, b.a_signed)
    return n


class PackedPartLinear(nn.Module):
    """Inference form of :class:`~qgait.nn.soft_quant.SoftQuantPartLinear` (per-part FCs).

    The weight integers are stored packed (int8, or two int4 per byte for <= 4 bits, in
    :func:`pack_weight`'s layout with the rows ``[P * C_out]`` as output channels) with their
    fp32 steps, and dequantized on the fly; the input is quantized with the layer's learned
    step. The result equals the fake-quant layer's (hard mode) exactly: both multiply the
    same integers by the same fp32 steps. This head runs once per sequence, so it is a small
    matrix product; what it saves is storage (the per-part FCs hold most of a gait model's
    parameters).
    """

    def __init__(self, layer: SoftQuantPartLinear):
        super().__init__()
        self.parts, self.in_channels, self.out_channels = (layer.parts, layer.in_channels,
                                                           layer.out_channels)
        self.w_bits, self.a_bits, self.a_signed = layer.w_bits, layer.a_bits, layer.a_signed
        rows = quantize_weight(layer.weight_rows(), layer.w_scale, layer.w_bits)
        self.register_buffer("w_packed", pack_weight(rows[:, :, None, None, None],
                                                     storage_bits(layer.w_bits)))
        self.register_buffer("w_scale", layer.w_scale.detach().float().clone())
        self.register_buffer("a_scale", layer.a_scale.detach().float().reshape(()).clone())

    def weight(self) -> torch.Tensor:
        """Dequantized weight ``[P, C_in, C_out]``."""
        w = unpack_weight(self.w_packed, storage_bits(self.w_bits), self.in_channels)
        w = w.reshape(-1, self.in_channels).float() * self.w_scale[:, None]
        return w.reshape(self.parts, self.out_channels, self.in_channels).permute(0, 2, 1)

    def forward(self, x):
        if self.a_bits is not None:
            x = soft_fake_quant(x, self.a_scale, bits=self.a_bits, signed=self.a_signed)
        return torch.bmm(x.permute(2, 0, 1), self.weight().to(x.dtype)).permute(1, 2, 0)

    def extra_repr(self):
        return (f"parts={self.parts}, in={self.in_channels}, out={self.out_channels}, "
                f"w_bits={self.w_bits}, a_bits={self.a_bits}")


def _convert(module: nn.Module, requantize: bool) -> int:
    PackedConv3d = _packed_cls()
    if isinstance(module, nn.Sequential):
        return _convert_sequential(module, requantize)
    n = 0
    for name, child in list(module._modules.items()):
        if isinstance(child, SoftQuantConv3d):
            module._modules[name] = PackedConv3d.from_soft(child)
            n += 1
        elif isinstance(child, SoftQuantPartLinear):
            module._modules[name] = PackedPartLinear(child)
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

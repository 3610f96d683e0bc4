"""``convert``: a trained fake-quant model -> packed integer inference (:class:`PackedConv3d`).

    >>> qgait.quantize_(model, QuantConfig(w_bits=4, a_bits=8)); train(model)
    >>> qgait.quant.convert(model.eval())
    >>> model_nbytes(model)        # int4 weights: 1/8 of their fp32 bytes, plus the steps

Every ``SoftQuantConv3d`` becomes a ``PackedConv3d`` holding the hard-mode integers of its
learned steps. Inside an ``nn.Sequential`` a ``BatchNorm3d`` that directly follows it, and then a
``ReLU`` / ``LeakyReLU``, are folded into its epilogue (BatchNorm with its running statistics,
i.e. eval semantics) and replaced by ``nn.Identity``.

With ``requantize=True`` a packed layer whose output goes straight into another packed layer
with quantized input writes that layer's int8 / uint8 codes directly, so a chain of
convolutions stays integer. "Straight into" is read from the module tree: the modules of an
``nn.Sequential`` (nested ones flattened, identities skipped) run one after another, and so do
the children a model names in a ``sequential_children`` attribute (GaitLite3D: stem, stage1,
pool1, stage2, stage3). A ``MaxPool3d`` (no padding) between two packed layers does not break
the chain: requantization ``q(z) = round(clamp(z / s))`` is monotone, so ``max(q(z)) =
q(max(z))`` and pooling the codes gives the codes of the pooled floats; it is replaced by a
:class:`PackedMaxPool3d`, which also takes integer codes. Any other module ends a chain (the
packed layer before it writes fp32). The result equals the unchained model's bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qgait.nn.soft_quant import SoftQuantConv3d, SoftQuantPartLinear, part_matmul
from qgait.ops import codes as _codes
from qgait.ops.codes import _triple, max_pool_codes
from qgait.ops.soft_quant import quant_grid, soft_fake_quant
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
    return n


class PackedMaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` (no padding, no indices) that also pools int8 / uint8 codes.

    torch's max_pool3d has no integer kernel; codes go through
    :func:`qgait.ops.codes.max_pool_codes` (a C++ kernel on the CPU), which is exact. The
    output is channels_last_3d, the layout the next packed layer reads fastest.
    """

    @classmethod
    def from_pool(cls, pool: nn.MaxPool3d) -> "PackedMaxPool3d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                   pool.return_indices, pool.ceil_mode)

    def forward(self, x):
        if x.is_floating_point():
            return super().forward(x)
        return max_pool_codes(x, self.kernel_size, self.stride)


def _chains_integer_pool(m: nn.Module) -> bool:
    """A max pooling that commutes with requantization and can be run on codes."""
    return (isinstance(m, nn.MaxPool3d) and not m.return_indices and not m.ceil_mode
            and all(p == 0 for p in _triple(m.padding))
            and all(d == 1 for d in _triple(m.dilation)))


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _flatten(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of the leaves ``module`` runs one after another."""
    names = (list(module._modules) if _is_plain_sequential(module)
             else list(getattr(module, "sequential_children", ())))
    out = []
    for name in names:
        child = module._modules[name]
        if child is None:
            continue
        if _is_plain_sequential(child) or hasattr(child, "sequential_children"):
            out += _flatten(child)
        else:
            out.append((module, name, child))
    return out


def _link_chains(module: nn.Module) -> None:
    """Let every packed layer that feeds another one (see the module docstring) write codes."""
    PackedConv3d = _packed_cls()
    if _is_plain_sequential(module) or hasattr(module, "sequential_children"):
        leaves = [e for e in _flatten(module) if not isinstance(e[2], nn.Identity)]
        for i, (_, _, a) in enumerate(leaves):
            if not isinstance(a, PackedConv3d):
                continue
            j = i + 1
            while j < len(leaves) and _chains_integer_pool(leaves[j][2]):
                j += 1
            if j < len(leaves) and isinstance(leaves[j][2], PackedConv3d) and leaves[j][2].a_bits:
                b = leaves[j][2]
                a.set_output_quant(b.a_scale, b.a_bits, b.a_signed)
                for parent, name, pool in leaves[i + 1:j]:
                    if not isinstance(pool, PackedMaxPool3d):
                        parent._modules[name] = PackedMaxPool3d.from_pool(pool)
        for leaf in (e[2] for e in leaves):
            _link_chains(leaf)
        # children outside the declared order (e.g. a model's head)
        named = set(getattr(module, "sequential_children", ()))
        if not _is_plain_sequential(module):
            for name, child in module.named_children():
                if name not in named:
                    _link_chains(child)
        return
    for child in module.children():
        _link_chains(child)


class PackedPartLinear(nn.Module):
    """Inference form of :class:`~qgait.nn.soft_quant.SoftQuantPartLinear` (per-part FCs).

    The weight integers are stored packed (int8, or two int4 per byte for <= 4 bits, in
    :func:`pack_weight`'s layout with the rows ``[P * C_out]`` as output channels) with their
    fp32 steps; the input is quantized with the layer's learned step. On the CPU without
    autograd (inference) the codes are multiplied with the integer weights in exact int32
    sums and scaled once (:func:`qgait.ops.codes.part_linear_codes`): the fp32 product of
    dequantized weights read 2 MB of weights per sequence at width 1.0. Elsewhere, and when
    gradients are wanted, the weights are dequantized and multiplied in fp32, which equals the
    fake-quant layer (hard mode) bit for bit; the integer sums agree with it up to fp32
    rounding. What the head saves besides is storage (the per-part FCs hold most of a gait
    model's parameters).
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

    def int_weight(self) -> torch.Tensor:
        """The weight integers ``[P, C_out, C_in]`` (int8)."""
        w = unpack_weight(self.w_packed, storage_bits(self.w_bits), self.in_channels)
        return w.reshape(self.parts, self.out_channels, self.in_channels).contiguous()

    def _dequantized(self, dtype) -> torch.Tensor:
        # Unpacking and scaling 0.5 M weights on every call cost 3.5-5% of a packed GaitLite3D
        # sequence (width 1.0, paired, 1 thread): the weight is kept (dtype None: the
        # integers), not saved, and rebuilt when a buffer is replaced or written in place
        # (load_state_dict, .to()).
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype)
                    for t in (self.w_packed, self.w_scale)) + (dtype,)
        cached = self.__dict__.get("_w_cache")
        if cached is None or cached[0] != key or torch.is_grad_enabled():
            # the float weight in its layout too: the fake-quant product, bit for bit
            w = self.int_weight() if dtype is None else self.weight().to(dtype)
            if torch.is_grad_enabled():
                return w
            self.__dict__["_w_cache"] = cached = (key, w)
        return cached[1]

    def forward(self, x):
        if (self.a_bits is not None and _codes._HAS_FC and x.device.type == "cpu"
                and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            qn, qp = quant_grid(self.a_bits, self.a_signed)
            return _codes.part_linear_codes(x, self.a_scale, qn, qp, self._dequantized(None),
                                            self.w_scale)
        if self.a_bits is not None:
            x = soft_fake_quant(x, self.a_scale, bits=self.a_bits, signed=self.a_signed)
        return part_matmul(x, self._dequantized(x.dtype))

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
        requantize: let packed layers that feed one another (consecutive in an
            ``nn.Sequential``, nested ones flattened, or in a model's ``sequential_children``;
            max pooling between them allowed) pass int8 / uint8 codes instead of fp32.
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
    if requantize:
        _link_chains(model)
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

"""convert(): a fake-quant model -> PackedConv3d; outputs, folding, chaining, save/load, size."""
import io

import pytest
import torch
import torch.nn as nn

from qgait.nn import SoftQuantConv3d
from qgait.ops import PackedConv3d, codes as _codes, quant_grid, soft_fake_quant
from qgait.quant import convert, model_nbytes


class GaitBlock(nn.Module):
    """A tiny gait-style backbone: binary silhouettes -> two conv stages -> a pooled head."""

    def __init__(self, w_bits=4, a_bits=8):
        super().__init__()
        self.stem = nn.Sequential(
            SoftQuantConv3d(1, 8, 3, padding=1, w_bits=w_bits, a_bits=None),
            nn.BatchNorm3d(8), nn.LeakyReLU(0.01),
            SoftQuantConv3d(8, 16, (3, 3, 3), padding=1, w_bits=w_bits, a_bits=a_bits),
            nn.BatchNorm3d(16), nn.ReLU(),
            SoftQuantConv3d(16, 12, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
                            w_bits=8, a_bits=a_bits),
        )
        self.side = SoftQuantConv3d(12, 6, (3, 1, 1), padding=(1, 0, 0), bias=False,
                                    w_bits=w_bits, a_bits=a_bits)

    def forward(self, x):
        return self.side(self.stem(x)).amax(dim=(2, 3, 4))


def _trained(w_bits=4, a_bits=8, seed=0):
    torch.manual_seed(seed)
    m = GaitBlock(w_bits, a_bits)
    x = (torch.rand(2, 1, 6, 16, 12) < 0.4).float()
    m.train()
    m(x)  # initialises the steps from a batch; also moves the BatchNorm statistics
    for bn in (m.stem[1], m.stem[4]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    return m.eval(), x


@pytest.mark.parametrize("requantize", [True, False])
@pytest.mark.parametrize("w_bits", [4, 8])
def test_convert_matches_fake_quant(w_bits, requantize):
    model, x = _trained(w_bits)
    with torch.no_grad():
        ref = model(x)
        convert(model, requantize=requantize)
        got = model(x)
    # every SoftQuantConv3d replaced; BN and activations after a conv folded into Identity
    assert not any(isinstance(m, SoftQuantConv3d) for m in model.modules())
    assert sum(isinstance(m, PackedConv3d) for m in model.modules()) == 4
    assert isinstance(model.stem[1], nn.Identity) and isinstance(model.stem[5], nn.Identity)
    assert model.stem[0].bn_scale is not None and model.stem[0].act == "leaky_relu"
    assert model.stem[3].act == "relu"
    assert (model.stem[0].out_scale is not None) == requantize
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_convert_chain_passes_integer_codes():
    model, x = _trained()
    convert(model)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
             for m in model.stem if isinstance(m, PackedConv3d)]
    model(x)
    for h in hooks:
        h.remove()
    # first layer: binary (float 0/1) in, codes out; middle: codes in and out; last of the chain: float out
    # (int8 codes where the next layer's grid is signed: after the LeakyReLU, input < 0 occurs)
    dt = [torch.int8 if model.stem[i].a_signed else torch.uint8 for i in (3, 6)]
    assert seen[0] == (torch.float32, dt[0]) and seen[1] == (dt[0], dt[1])
    assert seen[2] == (dt[1], torch.float32)


def test_save_load_and_size():
    model, x = _trained(w_bits=4)
    fq_bytes = model_nbytes(model)
    convert(model)
    y = model(x)
    # a packed state dict is plain tensors: it reads back with weights_only=True (whole
    # models are saved by qgait.model_io, tests/test_model_io.py)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    # int4 weights take 1/8 of the fp32 bytes (C_in even), plus the per-channel steps
    conv = model.stem[3]
    assert conv.w_packed.numel() * conv.w_packed.element_size() * 8 == 16 * 8 * 27 * 4
    assert model_nbytes(model) < fq_bytes / 4
    # a state_dict round trip into a freshly converted model
    other, _ = _trained(w_bits=4, seed=1)
    convert(other)
    other.load_state_dict(state)
    assert torch.equal(other(x), y)


def test_convert_rejects_uninitialised():
    m = nn.Sequential(SoftQuantConv3d(2, 4, 3))
    with pytest.raises(ValueError, match="uninitialised"):
        convert(m)


def test_convert_part_linear_inside_sequential():
    from qgait.nn import SoftQuantPartLinear
    from qgait.quant.convert import PackedPartLinear

    torch.manual_seed(0)
    head = nn.Sequential(nn.Identity(), SoftQuantPartLinear(3, 5, 4, w_bits=4, a_bits=8))
    x = torch.randn(2, 5, 3)
    head(x)  # initialises the steps
    ref = head(x)
    convert(head)
    assert isinstance(head[1], PackedPartLinear)
    torch.testing.assert_close(head(x), ref, rtol=1e-5, atol=1e-6)


def test_part_linear_dequantized_weight_is_kept_and_follows_its_buffers():
    from qgait.nn import SoftQuantPartLinear
    from qgait.quant.convert import PackedPartLinear

    torch.manual_seed(0)
    layers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        soft = SoftQuantPartLinear(3, 6, 5, w_bits=4, a_bits=8)
        soft(torch.randn(2, 6, 3))
        layers.append(PackedPartLinear(soft))
    a, b = layers
    x = torch.randn(2, 6, 3)

    def direct(m):  # the product without the kept weight
        if _codes._HAS_FC:   # inference on the CPU: integer sums (test_codes.py checks the op)
            qn, qp = quant_grid(m.a_bits, m.a_signed)
            return _codes.part_linear_codes_ref(x, m.a_scale, qn, qp, m.int_weight(), m.w_scale)
        q = soft_fake_quant(x, m.a_scale, bits=m.a_bits, signed=m.a_signed)
        return torch.bmm(q.permute(2, 0, 1), m.weight()).permute(1, 2, 0)

    with torch.inference_mode():
        first = a(x)
        assert torch.equal(first, direct(a)) and torch.equal(a(x), first)
    with torch.no_grad():
        assert torch.equal(a(x), first)
        a.load_state_dict(b.state_dict())      # new weights, written in place: rebuilt
        assert torch.equal(a(x), direct(b)) and not torch.equal(a(x), first)
        a.w_scale.mul_(2)                      # an in-place change of a step: rebuilt
        assert torch.allclose(a(x), 2 * direct(b))
    y = a(x.requires_grad_())                  # with autograd: a fresh weight, gradients flow
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert "_w_cache" not in a.state_dict()


# ---- integer between layers in a nested model (GaitLite3D) -------------------------------------
def _gaitlite(w_bits, a_bits, width=0.25, seed=0):
    from qgait.models import GaitLite3D
    from qgait.quant import QuantConfig, quantize_

    torch.manual_seed(seed)
    m = GaitLite3D(num_classes=0, width=width)
    quantize_(m, QuantConfig(w_bits=w_bits, a_bits=a_bits))
    x = (torch.rand(1, 1, 8, 64, 44) < 0.3).float()
    m.train()
    m(x)  # initialises the steps
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm3d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval(), x


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 4)])
def test_gaitlite_chain_is_integer_and_exact(cpu_isa, w_bits, a_bits):
    """convert() chains every packed conv of GaitLite3D's trunk through its nested blocks and the
    max pooling (codes between layers, fp32 only out of the last); the embeddings equal the
    unchained conversion's bit for bit, and the fake-quant model's (hard mode) where the part
    FCs multiply in fp32 as the fake-quant layer does (with autograd on); the integer part
    FCs of inference agree with that up to fp32 rounding."""
    import copy

    from qgait.quant.convert import PackedMaxPool3d

    model, x = _gaitlite(w_bits, a_bits)
    with torch.no_grad():
        ref = model(x)["embeddings"]
        flat = convert(copy.deepcopy(model), requantize=False)
        chained = convert(copy.deepcopy(model))
        packed = [m for m in chained.modules() if isinstance(m, PackedConv3d)]
        assert len(packed) == 6 and isinstance(chained.pool1, PackedMaxPool3d)
        assert [m.out_scale is not None for m in packed] == [True] * 5 + [False]
        seen = []
        hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((i[0].dtype, o.dtype)))
                 for m in packed]
        got = chained(x)["embeddings"]
        for h in hooks:
            h.remove()
        assert all(not o.is_floating_point for _, o in seen[:5]) and seen[5][1] == torch.float32
        assert all(not i.is_floating_point for i, _ in seen[1:])
        assert torch.equal(got, flat(x)["embeddings"])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        with torch.enable_grad():
            assert torch.equal(chained(x)["embeddings"], ref)
        # a clip shorter than the stem's temporal kernel, and sequences packed along T
        short = x[:, :, :2]
        assert torch.equal(chained(short)["embeddings"], flat(short)["embeddings"])
        with torch.enable_grad():
            assert torch.equal(chained(x, seqL=[3, 5])["embeddings"],
                               model(x, seqL=[3, 5])["embeddings"])


def test_packed_maxpool_codes_commute_with_requantization():
    from qgait.quant.convert import PackedMaxPool3d

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, 9, 7, generator=g)
    q = lambda t: torch.round(torch.clamp(t / 0.1, -128, 127)).to(torch.int8)  # noqa: E731
    # overlapping windows, and non-overlapping ones (stride = kernel: pooled an axis at a
    # time) of 2 and 3 on odd sizes, so the floored tails are dropped
    for k, s in (((1, 2, 2), (1, 2, 2)), ((2, 3, 3), (1, 2, 2)), ((2, 2, 2), (2, 2, 2)),
                 ((1, 3, 3), (1, 3, 3)), ((3, 1, 2), (3, 1, 2))):
        pool = PackedMaxPool3d.from_pool(nn.MaxPool3d(k, s))
        want = q(nn.functional.max_pool3d(z, k, s))
        codes = pool(q(z).contiguous(memory_format=torch.channels_last_3d))
        assert codes.dtype == torch.int8 and torch.equal(codes, want), (k, s)
        assert codes.is_contiguous(memory_format=torch.channels_last_3d)
        assert torch.equal(pool(q(z)), want), (k, s)   # an NCDHW-contiguous input too
        u = (q(z).to(torch.int16) + 128).to(torch.uint8)
        assert torch.equal(pool(u), (want.to(torch.int16) + 128).to(torch.uint8)), (k, s)
        assert torch.equal(pool(z), nn.functional.max_pool3d(z, k, s))

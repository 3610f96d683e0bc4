"""SoftQuantConv3d / Conv2d / Linear, quantize_, set_quant_mode and QuantConfig."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qgait
from qgait.nn.soft_quant import lsq_weight_init, mse_act_init, mse_weight_init
from qgait.ops import SoftQuantConv2d, SoftQuantConv3d, SoftQuantLinear, soft_fake_quant
from qgait.ops.soft_quant import quant_grid


def _conv3d(**kw):
    torch.manual_seed(0)
    return nn.Conv3d(4, 6, (3, 3, 3), stride=(1, 2, 2), padding=1, **kw)


def test_conv3d_k0_equals_conv_on_fake_quantized_tensors():
    conv = _conv3d()
    q = SoftQuantConv3d.from_float(conv, w_bits=4, a_bits=4)
    x = torch.relu(torch.randn(2, 4, 5, 9, 7))
    y = q(x)  # first batch initialises the steps
    assert bool(q.initialized) and not q.a_signed
    wq = torch.fake_quantize_per_channel_affine(conv.weight, q.w_scale.detach(),
                                                torch.zeros(6, dtype=torch.int32), 0, -8, 7)
    xq = torch.fake_quantize_per_tensor_affine(x, q.a_scale.item(), 0, 0, 15)
    ref = F.conv3d(xq, wq, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_constructor_mirrors_nn_conv3d():
    q = SoftQuantConv3d(3, 8, kernel_size=(1, 3, 3), stride=2, padding=(0, 1, 1), dilation=1,
                        bias=False, w_bits=8, a_bits=None)
    c = nn.Conv3d(3, 8, kernel_size=(1, 3, 3), stride=2, padding=(0, 1, 1), bias=False)
    x = torch.rand(1, 3, 4, 10, 8).round()
    assert q(x).shape == c(x).shape
    assert q.bias is None and q.w_scale.shape == (8,)


def test_binary_input_untouched_with_a_bits_none():
    q = SoftQuantConv3d.from_float(nn.Conv3d(1, 4, 3, padding=1), w_bits=8, a_bits=None)
    x = torch.rand(2, 1, 4, 8, 6).round()
    y = q(x)
    assert torch.equal(q.quantized_input(x), x)
    ref = F.conv3d(x, q.quantized_weight(), q.bias, padding=1)
    torch.testing.assert_close(y, ref)


def test_signed_activation_grid_for_signed_input():
    q = SoftQuantConv3d(2, 3, 1, a_bits=8)
    x = torch.randn(1, 2, 3, 4, 4)
    q(x)
    assert q.a_signed


def test_gradients_reach_weights_and_steps():
    q = SoftQuantConv3d.from_float(_conv3d(), w_bits=4, a_bits=4, k=3.0)
    x = torch.relu(torch.randn(2, 4, 3, 6, 6)).requires_grad_()
    q(x).square().mean().backward()
    for p in (q.weight, q.bias, q.w_scale, q.a_scale, x):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


def test_init_rules():
    w = torch.randn(5, 3, 3)
    s = lsq_weight_init(w, 4)
    torch.testing.assert_close(s, 2 * w.abs().reshape(5, -1).mean(1) / 7**0.5)
    # the MSE search beats naive max scaling on a heavy-tailed activation
    x = torch.cat([torch.rand(10000), torch.tensor([40.0])])
    sm = mse_act_init(x, 4, signed=False)
    naive = x.max() / 15
    def err(s):
        return (torch.clamp(torch.round(x / s), 0, 15) * s - x).pow(2).sum()
    assert err(sm) < err(naive)


def test_mse_weight_init():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 3.0, 6)[:, None, None, None]
    w[2, 0, 0, 0] = 25.0                                   # one heavy-tailed row
    for bits in (8, 4, 2):
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        rows = w.reshape(6, -1)

        def err(s):
            return (torch.clamp(torch.round(rows / s[:, None]), qn, qp) * s[:, None]
                    - rows).pow(2).sum(1)
        s = mse_weight_init(w, bits)
        assert s.shape == (6,) and (s > 0).all()
        # per row, the best of the 64 candidates (brute force) and no worse than LSQ's step
        amax = rows.abs().amax(1)
        for c in range(6):
            cands = [(a / 64) * amax[c] / qp for a in range(1, 65)]
            errs = [float(err(torch.full((6,), float(x)))[c]) for x in cands]
            assert float(err(s)[c]) == pytest.approx(min(errs), rel=1e-6)
        assert (err(s) <= err(lsq_weight_init(w, bits)) * (1 + 1e-6)).all()
    # at 8 bits LSQ's step leaves most of the grid unused on gaussian rows; the MSE step uses it
    g = torch.randn(16, 288)
    used = lambda s: (g / s[:, None]).abs().amax(1).round()   # noqa: E731
    assert (used(lsq_weight_init(g, 8)) < 40).all() and (used(mse_weight_init(g, 8)) > 90).all()


def test_conv2d_and_linear():
    torch.manual_seed(0)
    lin = nn.Linear(10, 7)
    q = SoftQuantLinear.from_float(lin, w_bits=8, a_bits=8)
    x = torch.randn(4, 10)
    y = q(x)
    ref = F.linear(soft_fake_quant(x, q.a_scale.detach(), bits=8, signed=True),
                   soft_fake_quant(lin.weight, q.w_scale.detach(), bits=8, axis=0), lin.bias)
    torch.testing.assert_close(y, ref)
    c2 = SoftQuantConv2d(3, 5, 3, padding=1)
    assert c2(torch.randn(2, 3, 8, 8)).shape == (2, 5, 8, 8)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                                  nn.Conv3d(8, 8, 1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(torch.relu(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3, 4)))


def test_quantize_swaps_in_place_with_filter_and_per_layer_bits():
    m = _Tiny()
    x = torch.rand(2, 1, 3, 6, 5).round()
    qgait.quantize_(m, qgait.QuantConfig(w_bits=8, a_bits=None),
                    filter_fn=lambda mod, fqn: fqn == "stem")
    qgait.quantize_(m, qgait.QuantConfig(w_bits=4, a_bits=4))
    assert isinstance(m.stem, SoftQuantConv3d) and m.stem.w_bits == 8 and m.stem.a_bits is None
    assert isinstance(m.body[0], SoftQuantConv3d) and m.body[0].w_bits == 4
    assert isinstance(m.body[3], SoftQuantConv3d) and isinstance(m.fc, SoftQuantLinear)
    assert isinstance(m.body[1], nn.BatchNorm3d)
    m(x).sum().backward()
    assert m.body[0].w_scale.grad is not None


def test_set_quant_mode_and_state_dict_round_trip(tmp_path):
    m = _Tiny()
    qgait.quantize_(m, qgait.QuantConfig(w_bits=4, a_bits=4))
    x = torch.rand(2, 1, 3, 6, 5).round()
    m.eval()
    m(x)
    assert qgait.set_quant_mode(m, k=5.0, mode="soft") == 4
    assert m.body[0].k == 5.0 and m.fc.mode == "soft"
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    m2 = _Tiny()
    qgait.quantize_(m2, qgait.QuantConfig(w_bits=4, a_bits=4))
    m2.load_state_dict(torch.load(path))
    m2.eval()
    assert m2.body[0].k == 5.0 and m2.body[0].mode == "soft"
    assert bool(m2.body[0].initialized)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    m3 = _Tiny()
    qgait.quantize_(m3, qgait.QuantConfig(w_bits=8, a_bits=4))
    with pytest.raises(ValueError, match="w_bits"):
        m3.load_state_dict(torch.load(path))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(w_bits=1), "w_bits"), (dict(w_bits=9), "w_bits"), (dict(w_bits=4.0), "w_bits"),
    (dict(a_bits=0), "a_bits"), (dict(k=-1), "k"), (dict(mode="fuzzy"), "mode"),
    (dict(w_init="max"), "w_init"), (dict(a_init="lsq"), "a_init"),
])
def test_quant_config_validates(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        qgait.QuantConfig(**kwargs)


def test_w_init_reaches_every_layer():
    # QuantConfig(w_init=...) -> each swapped layer's first batch sets its weight steps by that
    # rule (the per-part FCs by their (part, channel) rows); lsq stays the default
    from qgait.models import GaitLite3D
    from qgait.nn.soft_quant import SOFT_QUANT_MODULES
    x = torch.rand(2, 1, 6, 64, 44).round()
    for init, rule in (("lsq", lsq_weight_init), ("mse", mse_weight_init)):
        torch.manual_seed(0)
        m = GaitLite3D(num_classes=3, width=0.25).eval()
        cfg = qgait.QuantConfig(w_bits=8, a_bits=8) if init == "lsq" else \
            qgait.QuantConfig(w_bits=8, a_bits=8, w_init=init)
        qgait.quantize_(m, cfg)
        with torch.no_grad():
            m(x)
        layers = [q for q in m.modules() if isinstance(q, SOFT_QUANT_MODULES)]
        assert len(layers) > 3 and all(q.w_init == init for q in layers)
        for q in layers:
            torch.testing.assert_close(q.w_scale.detach(), rule(q.weight_rows(), 8))
    with pytest.raises(ValueError, match="w_init"):
        SoftQuantConv3d(1, 2, 3, w_init="max")


def test_a_init_reaches_every_layer():
    # QuantConfig(a_init=...) -> each quantized input's step is its first batch's by that rule:
    # max|x| / qp (mse_act_init's candidates are fractions of it, so never larger) or the
    # 99.995th percentile (in between on these layers); mse stays the default
    from qgait.models import GaitLite3D
    from qgait.nn.soft_quant import (SOFT_QUANT_MODULES, max_act_init, mse_act_init,
                                     percentile_act_init)
    x = torch.rand(2, 1, 6, 64, 44, generator=torch.Generator().manual_seed(0)).round()
    rules = {"mse": mse_act_init, "max": max_act_init, "pct": percentile_act_init}
    for init, rule in rules.items():
        torch.manual_seed(0)
        m = GaitLite3D(num_classes=3, width=0.25).eval()
        qgait.quantize_(m, qgait.QuantConfig(w_bits=8, a_bits=8, a_init=init)
                        if init != "mse" else qgait.QuantConfig(w_bits=8, a_bits=8))
        seen = {}

        def keep_first(f):
            def hook(mod, args):                    # returns None: the input is unchanged
                seen.setdefault(f, args[0].clone())
            return hook
        for f, q in m.named_modules():
            if isinstance(q, SOFT_QUANT_MODULES):
                q.register_forward_pre_hook(keep_first(f))
        with torch.no_grad():
            m(x)
        layers = {f: q for f, q in m.named_modules() if isinstance(q, SOFT_QUANT_MODULES)}
        assert len(layers) > 3 and all(q.a_init == init for q in layers.values())
        for f, q in layers.items():
            torch.testing.assert_close(q.a_scale.detach(), rule(seen[f], 8, q.a_signed))
    # the rules' order, on the same inputs (each run's later layers see other inputs, as the
    # earlier layers quantize by other rules)
    steps = {n: {f: float(r(seen[f], 8, q.a_signed)) for f, q in layers.items()}
             for n, r in rules.items()}
    assert all(steps["mse"][f] <= steps["max"][f] * (1 + 1e-6) for f in layers)
    assert all(steps["pct"][f] <= steps["max"][f] * (1 + 1e-6) for f in layers)
    assert any(steps["mse"][f] < 0.95 * steps["max"][f] for f in layers)   # it clips
    assert any(steps["pct"][f] < steps["max"][f] for f in layers)
    with pytest.raises(ValueError, match="a_init"):
        SoftQuantConv3d(1, 2, 3, a_init="lsq")


def test_percentile_act_init():
    # the q-th percentile of |x| over the grid's positive end, on a subsample when x is large;
    # q = 100 is max_act_init
    from qgait.nn.soft_quant import max_act_init, percentile_act_init
    x = -torch.arange(1, 10001, dtype=torch.float32)      # |x| = 1..10000
    torch.testing.assert_close(percentile_act_init(x, 8, True, q=50.0),
                               torch.quantile(x.abs(), 0.5) / 127)
    torch.testing.assert_close(percentile_act_init(x, 4, False, q=100.0), max_act_init(x, 4, False))
    big = percentile_act_init(x, 8, False, q=99.0, max_samples=1000)   # every 11th element
    assert abs(float(big) * 255 - 9900) < 15
    with pytest.raises(ValueError, match="q must be"):
        percentile_act_init(x, 8, True, q=0.0)
    # a layer's own percentile (a sweep's), else the module's default
    layer = SoftQuantConv3d(1, 2, 1, a_init="pct")
    xs = torch.randn(1, 1, 4, 8, 8)
    layer.init_steps(xs)
    torch.testing.assert_close(layer.a_scale.detach(), percentile_act_init(xs, 8, True))
    layer.a_percentile = 50.0
    layer.init_steps(xs)
    torch.testing.assert_close(layer.a_scale.detach(), percentile_act_init(xs, 8, True, q=50.0))


def test_quantize_model_passes_w_init():
    # the training stages' quant.w_init reaches the kept-8-bit and binary-input layers too
    from qgait.models import GaitLite3D
    from qgait.nn.soft_quant import SOFT_QUANT_MODULES
    from qgait.pipeline.stages import quantize_model
    from qgait.train.config import DEFAULTS
    q = {**DEFAULTS["quant"], "w_bits": 4, "a_bits": 4, "w_init": "mse", "a_init": "pct"}
    m = quantize_model(GaitLite3D(num_classes=3, width=0.25), q)
    inits = {f: (l.w_init, l.a_init) for f, l in m.named_modules()
             if isinstance(l, SOFT_QUANT_MODULES)}
    assert inits and set(inits.values()) == {("mse", "pct")} and "stem.0" in inits \
        and "fc" in inits
    assert (DEFAULTS["quant"]["w_init"], DEFAULTS["quant"]["a_init"]) == ("lsq", "mse")


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="bits"):
        SoftQuantConv3d(1, 2, 3, w_bits=12)
    with pytest.raises(ValueError, match="mode"):
        SoftQuantConv3d(1, 2, 3, mode="x")
    with pytest.raises(TypeError, match="expected nn.Conv3d"):
        SoftQuantConv3d.from_float(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="QuantConfig"):
        qgait.quantize_(_Tiny(), {"w_bits": 4})


def test_module_compiles():
    q = SoftQuantConv3d.from_float(_conv3d(), w_bits=4, a_bits=4, k=2.0)
    x = torch.relu(torch.randn(1, 4, 3, 6, 6))
    q(x)  # initialise outside the compiled region
    cq = torch.compile(q, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cq(x), q(x))


def test_from_float_to_float_round_trip():
    c = _conv3d()
    q = SoftQuantConv3d.from_float(c, w_bits=4, a_bits=4)
    c2 = q.to_float()
    assert torch.equal(c2.weight, c.weight) and torch.equal(c2.bias, c.bias)
    assert c2.stride == c.stride and c2.padding == c.padding


def test_quant_grid():
    assert quant_grid(8, True) == (-128, 127)
    assert quant_grid(4, False) == (0, 15)
    assert quant_grid(2, True) == (-2, 1)


def test_config_checks_w_init():
    from qgait.errors import ConfigError
    from qgait.train import load_config
    from qgait.nn.soft_quant import A_INITS, W_INITS
    from qgait.train.config import _CHOICES
    assert _CHOICES[("quant", "w_init")] == W_INITS and _CHOICES[("quant", "a_init")] == A_INITS
    with pytest.raises(ConfigError, match=r"quant\.a_init = 'lsq'"):
        load_config("casia_b11_qgait_w1", {"quant": {"a_init": "lsq"}})
    assert load_config("casia_b11_qgait_w1", {"quant": {"w_init": "mse"}})["quant"]["w_init"] \
        == "mse"
    with pytest.raises(ConfigError, match=r"quant\.w_init = 'max'"):
        load_config("casia_b11_qgait_w1", {"quant": {"w_init": "max"}})

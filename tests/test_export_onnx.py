"""ONNX export (qgait.export.onnx): onnxruntime's embeddings vs qgait's hard-mode fake-quant model,
the QDQ graph structure, INT4 and the portable 8-bit + Clip form, dynamic T, OnnxEmbedder.

Tolerances. QuantizeLinear / DequantizeLinear round half to even and saturate like qgait's hard
forward, and the weights are stored as the very integers the fake quant rounds to, so

* with exactly representable (dyadic) steps, BN and weights every fp32 operation of both models
  is exact, and the embeddings must be equal bit for bit (test_exact_on_dyadic_model; rounding
  ties and saturation happen there by the thousand, so half-to-even and the grid bounds are
  exercised);
* with learned steps, the graphs differ only in fp32 summation order (Conv, MatMul, ReduceMean)
  and in QuantizeLinear's ``x / s`` against the fake quant's ``x * fp32(1/s)``. The longest
  reduction between the last quantizer and the output is a strip mean of at most 11 * 16 = 176
  terms (then a 32-term MatMul), so the summation error is below ``176 * 2^-24 ~= 1.05e-5`` of the
  magnitudes: RTOL_SUM = 1e-5 of max|embeddings|. A value lying within that error of a rounding
  boundary rounds to the neighbouring code in one of the graphs (a "flip"), which moves one
  activation by one step. In the test model a flip is diluted by the strip means and absorbed by
  the FC-input quantizers; what can reach the output is a flipped FC-input code, which moves its
  part's embedding by at most ``s_a * max|W_q|``. So there: every sequence within RTOL_SUM,
  except at most MAX_FLIPPED_FRACTION of them, which must be within two such flips (measured over
  40 sequences: W8A8 one flip, 5.5e-4 relative against a one-flip bound of 7.3e-4, the others
  below 2e-7; W4A4 none). In a calibrated W8A8 GaitLite3D (wider maps, float per-part FC)
  flips do happen and cascade through the trunk (2 -> 9 -> 180 -> 893 differing codes over its
  quantizers, all by one step, the first ones within 7e-6 of a tie), ~1e-3 of max|embedding|:
  exactly as large as torch's own fp32 error against the float64 evaluation of the same model.
  test_flips_on_gaitlite3d_... checks that mechanism and asserts onnxruntime's error against
  float64 is at most twice torch's.
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx", reason="qgait.export needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="OnnxEmbedder needs onnxruntime")

import qgait  # noqa: E402
from qgait.export import OnnxEmbedder, export_onnx, ort_int4_support  # noqa: E402
from qgait.export import onnx as qonnx  # noqa: E402
from qgait.export.onnx import default_example, pack_int4, weight_integers  # noqa: E402
from qgait.ops import SoftQuantConv3d, SoftQuantLinear, set_pool_hpp  # noqa: E402

RTOL_SUM = 1e-5
MAX_FLIPPED_FRACTION = 0.1
TP = onnx.TensorProto
INPUT = qonnx.INPUT_NAME
INT4_OK, INT4_WHY = ort_int4_support()


# ---------------------------------------------------------------------------------------------
# The test model: GaitLite3D's structure in miniature.
# ---------------------------------------------------------------------------------------------
class TinyGait(nn.Module):
    """stem SoftQuantConv3d (a_bits=None: binary input) -> BN -> LeakyReLU, block1 (3x3x3) -> BN
    -> ReLU (so block2's input uses the unsigned grid), MaxPool3d, block2 (1x3x3) -> BN ->
    LeakyReLU (signed grid for the FCs), set_pool_hpp, one SoftQuantLinear per part."""

    def __init__(self, w_bits, a_bits, c=8, emb=16, bins=(16, 8, 4, 2, 1), slope=0.01):
        super().__init__()
        q = dict(w_bits=w_bits, a_bits=a_bits)
        self.stem = nn.Sequential(
            SoftQuantConv3d(1, c, 3, (1, 2, 2), 1, bias=False, w_bits=w_bits, a_bits=None),
            nn.BatchNorm3d(c), nn.LeakyReLU(slope))
        self.block1 = nn.Sequential(SoftQuantConv3d(c, 2 * c, 3, 1, 1, bias=False, **q),
                                    nn.BatchNorm3d(2 * c), nn.ReLU())
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.block2 = nn.Sequential(
            SoftQuantConv3d(2 * c, 2 * c, (1, 3, 3), 1, (0, 1, 1), bias=False, **q),
            nn.BatchNorm3d(2 * c), nn.LeakyReLU(slope))
        self.bins = bins
        self.fc = nn.ModuleList(SoftQuantLinear(2 * c, emb, **q) for _ in range(sum(bins)))

    def trunk(self, x):
        return self.block2(self.pool(self.block1(self.stem(x))))

    def forward(self, x, seqL=None):
        # packed sequences run through the trunk one by one (temporal kernels must not see a
        # neighbour's frames), as in GaitLite3D
        if seqL is not None and len(seqL) > 1:
            f = torch.cat([self.trunk(p) for p in torch.split(x, list(seqL), dim=2)], dim=2)
        else:
            f = self.trunk(x)
        p = set_pool_hpp(f, seqL, self.bins)                                     # [N, C, P]
        return {"embeddings": torch.stack([fc(p[:, :, i]) for i, fc in enumerate(self.fc)], -1)}


@torch.no_grad()
def calibrate(m: nn.Module, batch: torch.Tensor) -> nn.Module:
    """One train-mode forward: SoftQuant steps initialise from it and BatchNorm's running
    statistics become its statistics (momentum None = cumulative average), so that the eval-mode
    activations the steps see are those they were initialised on. Returns m in eval mode."""
    bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    m.train()
    m(batch)
    for bn in bns:
        bn.momentum = 0.1
    return m.eval()


def make_model(w_bits, a_bits, hw=(64, 44), **kw):
    """A TinyGait calibrated on a batch of 4 silhouette-like sequences."""
    torch.manual_seed(w_bits * 10 + a_bits)
    m = TinyGait(w_bits, a_bits, **kw)
    m.input_hw = hw
    return calibrate(m, torch.cat([default_example(m, 12, seed=s) for s in range(4)]))


def embed(model, x):
    with torch.no_grad():
        return model(x)["embeddings"]


def flip_bound(model) -> float:
    """Largest embedding change one flipped FC-input code can cause: max_p s_a,p * max|W_q,p|."""
    return max(float(fc.a_scale.detach()) * float(fc.quantized_weight().detach().abs().max()) for fc in model.fc)


def check_close(model, emb_fn, xs):
    """The tolerance of the module docstring over sequences ``xs``; returns the rel. diffs."""
    rel, exceed = [], []
    bound = flip_bound(model)
    for x in xs:
        want, got = embed(model, x), emb_fn(x)
        assert got.shape == want.shape
        d = float((got - want).abs().max())
        scale = float(want.abs().max())
        rel.append(d / scale)
        if d > RTOL_SUM * scale:
            exceed.append(d)
            assert d <= RTOL_SUM * scale + 2 * bound, \
                f"diff {d:.3g} exceeds two one-step flips at an FC input ({2 * bound:.3g})"
    assert len(exceed) <= MAX_FLIPPED_FRACTION * len(xs), \
        f"{len(exceed)} of {len(xs)} sequences beyond rtol {RTOL_SUM}: {exceed}"
    return rel


SEQS = [(8, 1), (13, 2), (30, 3), (1, 4), (21, 5), (13, 6)]  # (T, seed): T differs from export


@pytest.fixture(scope="module")
def models():
    return {(w, a): make_model(w, a) for w, a in [(8, 8), (4, 4)]}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Every (bits, int4 mode) exported once, traced with T = 8."""
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for (w, a), m in models.items():
        for int4 in ("auto", False):
            if w == 8 and int4 is False:
                continue
            path = d / f"w{w}a{a}_{int4}.onnx"
            info = export_onnx(m, path, example=default_example(m, 8, seed=0), int4=int4)
            out[(w, a, int4)] = info
    return out


# ---------------------------------------------------------------------------------------------
# Numerics.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [(8, 8, "auto"), (4, 4, "auto"), (4, 4, False)],
                         ids=["w8a8", "w4a4-auto", "w4a4-portable"])
def test_matches_qgait(models, exported, key):
    info = exported[key]
    m = models[key[:2]]
    assert info["max_rel_diff"] <= RTOL_SUM  # export's own check on its example
    emb = OnnxEmbedder(info["path"])
    xs = [default_example(m, T, seed=s) for T, s in SEQS]
    # not a degenerate model: the embeddings depend on the input
    a, b = embed(m, xs[0]), embed(m, xs[1])
    assert float((a != b).float().mean()) > 0.5 and float((a - b).abs().max()) > 0.05 * float(
        a.abs().max())
    check_close(m, emb, xs)


def test_dynamic_T(models, exported):
    """Traced with T = 8; the input's T axis is symbolic and T = 13 runs and matches."""
    info = exported[(8, 8, "auto")]
    g = onnx.load(info["path"]).graph
    dims = g.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [1, 1, "T", 64, 44]
    out = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    assert out == [1, 16, 31]
    m = models[(8, 8)]
    x = default_example(m, 13, seed=9)
    got = OnnxEmbedder(info["path"])(x)
    want = embed(m, x)
    assert got.shape == (1, 16, 31)
    # this sequence happens to flip one FC-input code (one part's embedding moves by ~4e-3):
    # the bound of the module docstring for a single sequence
    assert float((got - want).abs().max()) <= RTOL_SUM * float(want.abs().max()) \
        + 2 * flip_bound(m)


def _dyadic(v: torch.Tensor) -> torch.Tensor:
    """Nearest power of two (sign kept)."""
    return torch.sign(v) * torch.exp2(torch.round(torch.log2(v.abs().clamp_min(1e-12))))


def make_dyadic_model(w_bits, a_bits):
    """A TinyGait whose every fp32 operation is exact: power-of-two steps (activation steps a
    quarter of the learned ones, so that grids saturate) and BN scales, BN bias
    on a 1/16 grid, mean 0, var 1, eps 0, LeakyReLU slope 1/4, strips of 2^k elements (input
    64 x 32 -> 16 x 8 maps). Then both graphs compute exactly the real-number result."""
    m = make_model(w_bits, a_bits, hw=(64, 32), slope=0.25)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (SoftQuantConv3d, SoftQuantLinear)):
                mod.w_scale.copy_(_dyadic(mod.w_scale))
                # a quarter of the learned step: many inputs saturate, which checks the
                # grid's bounds (the Clip of 4-bit grids in 8-bit containers) as well
                mod.a_scale.copy_(_dyadic(mod.a_scale) / 4)
                if mod.bias is not None:
                    mod.bias.copy_(torch.round(mod.bias * 16) / 16)
            elif isinstance(mod, nn.BatchNorm3d):
                mod.weight.copy_(_dyadic(mod.weight))
                mod.bias.copy_(torch.round(mod.bias * 16) / 16)
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
                mod.eps = 0.0
    return m


@pytest.mark.parametrize("bits,int4", [((8, 8), "auto"), ((4, 4), "auto"), ((4, 4), False)],
                         ids=["w8a8", "w4a4-auto", "w4a4-portable"])
def test_exact_on_dyadic_model(tmp_path, bits, int4):
    m = make_dyadic_model(*bits)
    ties, saturated = [], []

    def count_ties(mod, inp, out):
        if mod.a_bits is not None:
            v = inp[0].double() / mod.a_scale.double()
            qn, qp = qgait.ops.quant_grid(mod.a_bits, mod.a_signed)
            ties.append(int(((v - v.floor()) == 0.5).sum()))
            saturated.append(int(((v > qp + 0.5) | (v < qn - 0.5)).sum()))

    hooks = [mod.register_forward_hook(count_ties) for mod in m.modules()
             if isinstance(mod, (SoftQuantConv3d, SoftQuantLinear))]
    xs = [default_example(m, T, seed=s) for T, s in [(8, 11), (17, 12)]]
    wants = [embed(m, x) for x in xs]
    for h in hooks:
        h.remove()
    # Precondition: the arithmetic is exact (fp32 == fp64 evaluation of the same model).
    m64 = make_dyadic_model(*bits).double()
    for x, want in zip(xs, wants):
        assert torch.equal(embed(m64, x.double()).float(), want)
    assert sum(ties) > 100, "the dyadic model should hit rounding ties (half to even)"
    assert sum(saturated) > 100, "the dyadic model should saturate its grids"
    info = export_onnx(m, tmp_path / "d.onnx", example=xs[0], int4=int4)
    emb = OnnxEmbedder(info["path"])
    for x, want in zip(xs, wants):
        torch.testing.assert_close(emb(x), want, rtol=0, atol=0)


def test_weight_integers_are_the_fake_quant_codes(models):
    """DequantizeLinear's w_int * s is the layer's hard fake-quant weight bit for bit."""
    for m in models.values():
        for mod in m.modules():
            if isinstance(mod, (SoftQuantConv3d, SoftQuantLinear)):
                q = weight_integers(mod)
                qn, qp = qgait.ops.quant_grid(mod.w_bits, True)
                assert int(q.min()) >= qn and int(q.max()) <= qp
                s = mod.w_scale.detach().reshape([-1] + [1] * (q.dim() - 1))
                assert torch.equal(q.float() * s, mod.quantized_weight().detach())


# ---------------------------------------------------------------------------------------------
# Graph structure.
# ---------------------------------------------------------------------------------------------
def _graph(path):
    g = onnx.load(path).graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    return g, prod, inits


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_weight_dq(node, prod, inits, axis, channels, int4):
    dq = prod[node.input[1]]
    assert dq.op_type == "DequantizeLinear", f"{node.name}: weight not dequantized"
    w, s, zp = (inits[i] for i in dq.input)
    assert w.data_type == (TP.INT4 if int4 else TP.INT8) and zp.data_type == w.data_type
    assert _attr(dq, "axis") == axis and list(s.dims) == [channels] and list(zp.dims) == [channels]
    if int4:
        assert len(w.raw_data) == math.ceil(math.prod(w.dims) / 2)  # packed nibbles
    return w


def _check_act_qdq(node, prod, inits, layer, int4_acts):
    """input <- DequantizeLinear <- QuantizeLinear [<- Clip]; types and bounds of the layer."""
    dq = prod[node.input[0]]
    assert dq.op_type == "DequantizeLinear", f"{node.name}: input not dequantized"
    q = prod[dq.input[0]]
    assert q.op_type == "QuantizeLinear" and q.input[1] == dq.input[1] and q.input[2] == dq.input[2]
    s = onnx.numpy_helper.to_array(inits[q.input[1]])
    assert s.shape == () and s == np.float32(layer.a_scale.item())
    zp = inits[q.input[2]]
    container = 4 if int4_acts and layer.a_bits <= 4 else 8
    want = {(4, True): TP.INT4, (4, False): TP.UINT4, (8, True): TP.INT8, (8, False): TP.UINT8}
    assert zp.data_type == want[(container, layer.a_signed)]
    assert onnx.numpy_helper.to_array(zp).item() == 0
    src = prod.get(q.input[0])
    qn, qp = qgait.ops.quant_grid(layer.a_bits, layer.a_signed)
    if layer.a_bits < container:
        assert src is not None and src.op_type == "Clip", f"{node.name}: narrower grid not clipped"
        lo, hi = (onnx.numpy_helper.to_array(inits[i]).item() for i in src.input[1:])
        assert lo == np.float32(qn) * s and hi == np.float32(qp) * s
    else:
        assert src is None or src.op_type != "Clip"


@pytest.mark.parametrize("key", [(8, 8, "auto"), (4, 4, "auto"), (4, 4, False)],
                         ids=["w8a8", "w4a4-auto", "w4a4-portable"])
def test_graph_structure(models, exported, key):
    info = exported[key]
    m = models[key[:2]]
    g, prod, inits = _graph(info["path"])
    assert all(n.domain in ("", "ai.onnx") for n in g.node), "placeholder or custom ops left"
    assert {o.domain: o.version for o in onnx.load(info["path"]).opset_import} == \
        {"": info["opset"]}
    convs = [n for n in g.node if n.op_type == "Conv"]
    mms = [n for n in g.node if n.op_type == "MatMul"]
    layers_conv = [m.stem[0], m.block1[0], m.block2[0]]
    assert len(convs) == 3 and len(mms) == len(m.fc) == 31
    w4, a4 = info["int4_weights"], info["int4_activations"]
    for node, layer in zip(convs, layers_conv):
        _check_weight_dq(node, prod, inits, 0, layer.out_channels, w4)
        if layer.a_bits is None:
            assert node.input[0] == g.input[0].name  # binary stem input: not quantized
        else:
            _check_act_qdq(node, prod, inits, layer, a4)
    for node, layer in zip(mms, m.fc):
        _check_weight_dq(node, prod, inits, 1, layer.out_features, w4)
        _check_act_qdq(node, prod, inits, layer, a4)
    # the pooling became plain reductions: one max over T, a mean + max per bin
    ops = [n.op_type for n in g.node]
    assert ops.count("ReduceMean") == 5 and ops.count("ReduceMax") == 1 + 5
    assert "Concat" in ops
    assert ops.count("QuantizeLinear") == 2 + 31 and ops.count("DequantizeLinear") == (3 + 31) + (2 + 31)


def test_opsets(models, tmp_path):
    """13 (first with per-axis DequantizeLinear) and 17 (portable default) export and match."""
    m = models[(4, 4)]
    for opset in (13, 17):
        info = export_onnx(m, tmp_path / f"o{opset}.onnx", opset=opset)
        assert info["opset"] == opset and not info["int4"] and info["max_rel_diff"] <= RTOL_SUM


# ---------------------------------------------------------------------------------------------
# INT4.
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not INT4_OK, reason=f"onnxruntime INT4: {INT4_WHY}")
def test_int4_auto_and_forced(models, exported, tmp_path):
    """auto: opset 21 with INT4 weights; INT4 activations only where onnxruntime's default
    optimizations run this graph (1.32 drops the UINT4 Q/DQ around MaxPool and then lacks a uint4
    MaxPool kernel), the reason in int4_why. int4=True writes INT4 everywhere: valid ONNX that
    onnxruntime runs with basic optimizations, with the same numbers."""
    info = exported[(4, 4, "auto")]
    assert info["opset"] == 21 and info["int4"] and info["int4_weights"]
    if not info["int4_activations"]:
        assert "refused by onnxruntime" in info["int4_why"]
    m = models[(4, 4)]
    forced = export_onnx(m, tmp_path / "forced.onnx", int4=True, check=False)
    assert forced["int4_activations"] and forced["opset"] == 21
    onnx.checker.check_model(onnx.load(forced["path"]), full_check=True)
    emb = OnnxEmbedder(forced["path"], optimization="basic")
    check_close(m, emb, [default_example(m, T, seed=s) for T, s in SEQS[:3]])
    g, prod, inits = _graph(forced["path"])
    zps = {inits[n.input[2]].data_type for n in g.node if n.op_type == "QuantizeLinear"}
    assert zps <= {TP.INT4, TP.UINT4} and "Clip" not in {n.op_type for n in g.node}


def test_int4_fallback_without_ort_support(models, tmp_path, monkeypatch):
    """Where onnxruntime cannot run INT4, auto writes the portable opset-17 form."""
    monkeypatch.setattr(qonnx, "ort_int4_support", lambda: (False, "simulated: no INT4"))
    info = export_onnx(models[(4, 4)], tmp_path / "fb.onnx")
    assert info["opset"] == 17 and not info["int4"] and info["int4_why"] == "simulated: no INT4"
    assert info["max_rel_diff"] <= RTOL_SUM


def test_pack_int4_layout():
    """Element 2i in the low nibble, two's complement; odd counts padded."""
    w = np.array([-8, 7, -1, 0, 3], np.int8)
    assert pack_int4(w) == bytes([0x78, 0x0F, 0x03])
    t = onnx.helper.make_tensor("w", TP.INT4, [5], pack_int4(w), raw=True)
    assert onnx.numpy_helper.to_array(t).astype(np.int8).tolist() == w.tolist()


def test_weight_bytes(models, exported):
    """INT4 weights take half the bytes of int8 (the tiny model's graph itself dominates its
    file; sizes of GaitLite3D are in the README)."""
    def weight_bytes(path):
        g, prod, inits = _graph(path)
        return sum(len(inits[prod[n.input[1]].input[0]].raw_data)
                   for n in g.node if n.op_type in ("Conv", "MatMul"))
    b8 = weight_bytes(exported[(8, 8, "auto")]["path"])
    b4 = weight_bytes(exported[(4, 4, "auto")]["path"])
    b4p = weight_bytes(exported[(4, 4, False)]["path"])
    n = sum(mod.weight.numel() for mod in models[(8, 8)].modules()
            if isinstance(mod, (SoftQuantConv3d, SoftQuantLinear)))
    assert b8 == n and b4p == n
    if exported[(4, 4, "auto")]["int4_weights"]:
        assert b4 == sum(math.ceil(mod.weight.numel() / 2) for mod in models[(4, 4)].modules()
                         if isinstance(mod, (SoftQuantConv3d, SoftQuantLinear)))


# ---------------------------------------------------------------------------------------------
# OnnxEmbedder.
# ---------------------------------------------------------------------------------------------
def test_embedder_seqL_and_batch(models, exported):
    m = models[(8, 8)]
    emb = OnnxEmbedder(exported[(8, 8, "auto")]["path"])
    lens = [8, 13, 5]
    seqs = [default_example(m, T, seed=20 + i) for i, T in enumerate(lens)]
    packed = torch.cat(seqs, dim=2)
    got = emb(packed, seqL=lens)
    want = torch.cat([embed(m, x) for x in seqs])
    assert got.shape == (3, 16, 31)
    assert float((got - want).abs().max()) <= RTOL_SUM * float(want.abs().max()) \
        + 2 * flip_bound(m)
    assert torch.equal(emb(packed, seqL=torch.tensor(lens)), got)
    batch = torch.cat([seqs[0], default_example(m, 8, seed=30)])  # N = 2, no seqL
    assert torch.equal(emb(batch)[0], got[0])
    with pytest.raises(ValueError, match="seqL"):
        emb(packed, seqL=[8, 13])
    with pytest.raises(ValueError, match="44"):
        emb(torch.zeros(1, 1, 8, 64, 40))


def test_embedder_in_evaluate(models, exported):
    """OnnxEmbedder is a drop-in embed_fn for qgait.evaluation.evaluate."""
    evaluation = pytest.importorskip("qgait.evaluation")
    fakes = pytest.importorskip("gait_fakes")
    ds = fakes.FakeGaitDataset(n_subjects=3, conds=["nm-01", "nm-02"], views=["000", "090"],
                               frames=6)
    m = models[(8, 8)]
    r_onnx = evaluation.evaluate(OnnxEmbedder(exported[(8, 8, "auto")]["path"]), ds, "generic",
                                 progress=False)
    r_torch = evaluation.evaluate(evaluation.model_embed_fn(m), ds, "generic", progress=False)
    assert r_onnx["generic"] == r_torch["generic"]


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------
def test_float_model_warns_and_exports_fp32(tmp_path):
    m = TinyGait(8, 8)
    m.stem[0] = m.stem[0].to_float()
    for name in ("block1", "block2"):
        getattr(m, name)[0] = getattr(m, name)[0].to_float()
    m.fc = nn.ModuleList(nn.Linear(16, 16) for _ in range(31))
    m.eval()
    with pytest.warns(UserWarning, match="no SoftQuant layers"):
        info = export_onnx(m, tmp_path / "fp.onnx")
    ops = {n.op_type for n in onnx.load(info["path"]).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"} and info["quant_layers"] == 0
    assert info["max_rel_diff"] <= RTOL_SUM


def test_bad_input(models, tmp_path):
    m = make_model(8, 8)
    qgait.set_quant_mode(m, mode="soft", k=4.0)
    with pytest.raises(ValueError, match="hard forward"):
        export_onnx(m, tmp_path / "x.onnx")
    fresh = TinyGait(8, 8)
    with pytest.raises(ValueError, match="uninitialised steps"):
        export_onnx(fresh, tmp_path / "x.onnx")
    good = models[(4, 4)]
    with pytest.raises(ValueError, match="opset"):
        export_onnx(good, tmp_path / "x.onnx", opset=12)
    with pytest.raises(ValueError, match="INT4 containers need opset 21"):
        export_onnx(good, tmp_path / "x.onnx", opset=17, int4=True)
    with pytest.raises(ValueError, match="int4 must be"):
        export_onnx(good, tmp_path / "x.onnx", int4="yes")
    with pytest.raises(ValueError, match=r"\[1, 1, T, H, W\]"):
        export_onnx(good, tmp_path / "x.onnx", example=torch.zeros(2, 1, 8, 64, 44))
    with pytest.raises(TypeError, match="whole model"):
        export_onnx(good.stem[0], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_leaves_the_model_untouched(models, tmp_path):
    m = models[(8, 8)]
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    kinds = [type(mod) for mod in m.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings either
        export_onnx(m, tmp_path / "u.onnx", check=False)
    assert m.training
    m.eval()
    assert [type(mod) for mod in m.modules()] == kinds
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(mod.mode == "hard" and mod.initialized for mod in m.modules()
               if isinstance(mod, (SoftQuantConv3d, SoftQuantLinear)))


# ---------------------------------------------------------------------------------------------
# CLI glue and GaitLite3D.
# ---------------------------------------------------------------------------------------------
def test_cli_export_gaitlite3d_checkpoint(tmp_path, monkeypatch, capsys):
    """A training checkpoint of a quantized GaitLite3D (a stand-in QAT stage) -> .onnx + .json;
    the BNNeck / classifier head is not part of the graph (embeddings only)."""
    import argparse
    import json

    trainer = pytest.importorskip("qgait.train.trainer")
    from qgait.export.cli import add_export_onnx_args, main_export_onnx
    from qgait.models import build_model
    from qgait.train import load_config

    def prepare(model, cfg):
        return qgait.quantize_(model, qgait.QuantConfig(w_bits=4, a_bits=4))

    monkeypatch.setitem(trainer.STAGES, "qat-test", trainer.Stage("qat-test", prepare))
    cfg = load_config(None, {"model": {"width": 0.25}})
    cfg["stage"] = "qat-test"
    m = cfg["model"]
    model = prepare(build_model(m["name"], num_classes=5, width=m["width"],
                                embed_dim=m["embed_dim"], bins=tuple(m["bins"]),
                                scale=m["scale"]), cfg)
    calibrate(model, torch.cat([default_example(model, 10, seed=s) for s in range(3)]))
    ck = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "config": cfg, "stage": "qat-test"}, ck)
    args = add_export_onnx_args(argparse.ArgumentParser()).parse_args(
        [str(ck), "--frames", "12"])
    assert main_export_onnx(args) == 0
    assert "wrote" in capsys.readouterr().out
    info = json.loads((tmp_path / "last.json").read_text())
    # 6 convs + the per-part FC (SoftQuantPartLinear)
    assert info["path"] == str(tmp_path / "last.onnx") and info["quant_layers"] == 7
    # 4-bit activation steps are ~16x coarser than 8-bit ones, so flips are ~16x rarer than in
    # the W8A8 GaitLite3D of the test below (measured here: 5e-7)
    assert info["max_rel_diff"] <= RTOL_SUM and info["int4_weights"] == INT4_OK
    g = onnx.load(info["path"]).graph
    assert [o.name for o in g.output] == ["embeddings"]
    assert sum(n.op_type == "Conv" for n in g.node) == 6
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) == 7  # stem's binary input too
    assert sum(n.op_type == "MatMul" for n in g.node) == 1  # the per-part FC, batched


def test_failed_export_restores_the_model(models, tmp_path, monkeypatch):
    m = models[(8, 8)]
    kinds = [type(mod) for mod in m.modules()]
    monkeypatch.delenv("QGAIT_BACKEND", raising=False)

    def boom(*a, **k):
        assert os.environ["QGAIT_BACKEND"] == "reference"  # inside the export context
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(m, tmp_path / "f.onnx")
    assert [type(mod) for mod in m.modules()] == kinds and not m.training
    assert "QGAIT_BACKEND" not in os.environ


def _with_outputs(path, names):
    """The model at ``path`` with extra float graph outputs ``names`` (serialized)."""
    p = onnx.load(path)
    for n in names:
        p.graph.output.append(onnx.helper.make_tensor_value_info(n, TP.FLOAT, None))
    return p.SerializeToString()


def test_flips_on_gaitlite3d_are_near_ties_and_as_large_as_torchs_own(tmp_path):
    """A calibrated W8A8 GaitLite3D does flip codes (a flip in the trunk reaches the embedding
    through the per-part FC). Checks the mechanism and the size:

    * in the first quantizer where any code onnxruntime computes differs from qgait's, it differs
      by one step and each differing value lay within the summation noise (RTOL_SUM * max|v|)
      of a rounding tie: a flip, not a semantic difference; later quantizers, which carry the
      flips on, differ by at most 2 steps in at most 10% of their codes;
    * against the exact math (float64), onnxruntime's error (max and RMS over 4 sequences) is at
      most 2x torch's own fp32 error, or RTOL_SUM where torch has none. (Measured here: about
      equal, ~1.2e-3 of max|embedding| at most for both; the flips cascade through the trunk.)
    """
    from qgait.models import GaitLite3D
    from qgait.nn.soft_quant import SOFT_QUANT_MODULES

    torch.manual_seed(0)
    m = qgait.quantize_(GaitLite3D(num_classes=0, width=0.5), qgait.QuantConfig(8, 8))
    calibrate(m, torch.cat([default_example(m, 12, seed=s) for s in range(3)]))
    info = export_onnx(m, tmp_path / "g.onnx", example=default_example(m, 8), check=False)

    g = onnx.load(info["path"]).graph
    qnodes = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq_of = {n.input[0]: n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    names = [dq_of[q.output[0]] for q in qnodes]
    sess = ort.InferenceSession(_with_outputs(info["path"], names),
                                providers=["CPUExecutionProvider"])
    layers = [mod for mod in m.modules() if isinstance(mod, SOFT_QUANT_MODULES)]
    assert len(layers) == len(qnodes) == 7  # graph order = module order here
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: seen.append(i[0])) for mod in layers]
    x = default_example(m, 16, seed=77)
    embed(m, x)
    for h in hooks:
        h.remove()
    outs = sess.run(None, {INPUT: x.numpy()})[1:]
    first = True
    from qgait.nn.soft_quant import SoftQuantPartLinear

    for mod, inp, dq in zip(layers, seen, outs):
        if isinstance(mod, SoftQuantPartLinear):
            inp = inp.permute(2, 0, 1)  # the graph quantizes the FC input after its Transpose
        qn, qp = qgait.ops.quant_grid(mod.a_bits, mod.a_signed)
        v = (inp * (1.0 / mod.a_scale.detach())).numpy()
        codes = np.clip(np.rint(v), qn, qp)
        d = np.rint(dq / mod.a_scale.item()) - codes
        if first and d.any():
            first = False
            assert np.abs(d).max() <= 1
            dist = np.abs(v - np.floor(v) - 0.5)[d != 0]
            assert dist.max() <= RTOL_SUM * np.abs(v).max(), "a code differs away from a tie"
        else:
            # later quantizers carry the earlier flips on, more at each layer; measured on an
            # Intel Xeon (onnxruntime 1.32): one flip in 180,224 codes of the third layer, then
            # 0.013%, 0.12%, 0.40% of the next layers' codes by one step, and 4.7% of the
            # per-part FC's input (max-pooled features) by up to 2 steps. A semantic difference
            # (a scale, a zero point) moves codes broadly.
            assert np.abs(d).max() <= 2 and (d != 0).mean() <= 0.1, (np.abs(d).max(), d.mean())

    # Size: against the exact math (the same model in float64), over several sequences (flips
    # are discrete events; one sequence's max says little), max and RMS error.
    import copy

    m64 = copy.deepcopy(m).double()
    emb = OnnxEmbedder(info["path"])
    e_ort, e_t32 = [], []
    for T, s in [(16, 300), (20, 301), (24, 302), (28, 303)]:
        x = default_example(m, T, seed=s)
        exact = embed(m64, x.double())
        e_t32.append(embed(m, x).double() - exact)
        e_ort.append(emb(x).double() - exact)
        scale = float(exact.abs().max())
    e_ort, e_t32 = torch.stack(e_ort), torch.stack(e_t32)
    floor = RTOL_SUM * scale
    assert float(e_ort.abs().max()) <= 2 * max(float(e_t32.abs().max()), floor)
    assert float(e_ort.pow(2).mean().sqrt()) <= 2 * max(float(e_t32.pow(2).mean().sqrt()), floor)

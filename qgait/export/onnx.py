r"""ONNX export of a fake-quant (hard-mode) qgait model as a QDQ graph, and an onnxruntime embedder.

    >>> info = export_onnx(model, "gait_w4a4.onnx")          # model: SoftQuant layers, trained
    >>> embed = OnnxEmbedder("gait_w4a4.onnx")
    >>> emb = embed(x, seqL=[30, 25])                         # [2, C, P], like the torch model

What the graph computes (the deployed form of the hard forward of every SoftQuant layer):

* activations: ``x -> [Clip] -> QuantizeLinear(a_scale, zp 0) -> DequantizeLinear -> Conv/MatMul``.
  The zero point's type carries the grid: uint8 / int8, or UINT4 / INT4 at opset 21. When the
  layer's grid ``[qn, qp]`` is narrower than its container (e.g. 4-bit in an 8-bit container,
  the portable form), a ``Clip(x, qn*s, qp*s)`` before the QuantizeLinear narrows it. The clip is
  exact: for ``x > qp*s`` it gives ``fp32(qp*s)``, which rounds to ``qp``.
* weights: pre-quantized integer initializers (``round_half_even(clamp(w * fp32(1/s), qn, qp))``,
  the integers the fake quant rounds to) -> ``DequantizeLinear`` (per output channel: axis 0 for
  Conv, axis 1 for the ``[in, out]`` MatMul weight) -> Conv / MatMul. DequantizeLinear's
  ``q * s`` is the fake quant's ``round(c) * s`` bit for bit.
* everything else is plain ONNX (BatchNormalization, LeakyRelu, MaxPool, ...); qgait's pooling
  ops are traced through their pure-PyTorch references, so ``set_pool_hpp`` becomes
  ``ReduceMax`` over T and, per bin, ``Reshape + ReduceMean + ReduceMax + Add``, then ``Concat``.

INT4 (opset 21): weights are INT4 initializers (two per byte) wherever onnxruntime runs INT4;
activations use INT4 / UINT4 zero points only if onnxruntime also runs this graph with its
default optimizations (1.32 does not when a MaxPool sits next to a UINT4 Q/DQ: it moves the pair
across the MaxPool and has no uint4 MaxPool kernel), else 8-bit containers + Clip (the same math).

Where it can differ from qgait: QuantizeLinear computes ``x / s`` and the fake quant
``x * fp32(1/s)``; the two agree to one ulp, so the code differs only when ``x / s`` lies within
an ulp of a rounding tie (measured: 2 in 10^6 random values at 8 bits). Runtimes also sum a
Conv / MatMul in another order (~1e-7 relative), which flips a code when a value sits that close
to a rounding boundary. Each such event moves one activation by one step, and later layers may
flip more codes in turn: a calibrated W8A8 GaitLite3D ends ~1e-3 of max|embedding| away, exactly
as far as torch's own fp32 forward is from its float64 evaluation (W4A4: ~5e-7). See
tests/test_export_onnx.py for the bounds. With exactly representable (dyadic) steps and weights the graph equals qgait bit for bit.

How: the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``; no onnxscript
dependency, and autograd Functions with a ``symbolic`` let us emit exactly the nodes we want).
During export each SoftQuant layer is swapped for a shim whose quantizers are autograd Functions
emitting placeholder nodes in the ``qgait_export`` domain; :func:`_lower` then replaces them by
the standard Clip / QuantizeLinear / DequantizeLinear nodes, choosing 4- or 8-bit containers,
and raises the opset to 21 for INT4 (the legacy exporter stops at 20; opset 21 only adds types
to the operators such a graph uses, which :func:`_lower` checks).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from qgait.nn.soft_quant import SOFT_QUANT_MODULES, SoftQuantLinear, SoftQuantPartLinear
from qgait.ops.soft_quant import quant_grid, soft_fake_quant_ref

OP = "export_onnx"
DOMAIN = "qgait_export"  # placeholder nodes; none survive _lower
PORTABLE_OPSET = 17
INT4_OPSET = 21
MIN_OPSET, MAX_OPSET = 13, 21  # 13: per-axis DequantizeLinear; 21: INT4 / UINT4
_TORCHSCRIPT_MAX_OPSET = 20
# Operators whose opset-21 version changes more than the accepted types (GroupNormalization-21
# takes per-channel instead of per-group scale and bias); a graph holding one is not bumped
# from 20 to 21 by rewriting the opset import.
_CHANGED_IN_21 = {"GroupNormalization"}
INPUT_NAME, OUTPUT_NAME = "silhouettes", "embeddings"


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"qgait::{OP}: needs the `onnx` package (pip install onnx)") from e
    return onnx


# ---------------------------------------------------------------------------------------------
# Placeholder quantizers: exact hard-mode forward for tracing, a qgait_export node in the graph.
# ---------------------------------------------------------------------------------------------
class _ActQDQ(torch.autograd.Function):
    """Per-tensor activation fake quant (hard). Graph: ``qgait_export::ActQDQ(x, s)``."""

    @staticmethod
    def forward(ctx, x, scale, bits: int, signed: bool):
        qn, qp = quant_grid(bits, signed)
        return soft_fake_quant_ref(x, scale, -1, qn, qp, 0.0, False)

    @staticmethod
    def symbolic(g, x, scale, bits, signed):
        y = g.op(f"{DOMAIN}::ActQDQ", x, scale, bits_i=bits, signed_i=int(signed))
        y.setType(x.type())
        return y


class _WeightDQ(torch.autograd.Function):
    """``w_int * s`` per channel along ``axis``. Graph: ``qgait_export::WeightDQ(w_int, s)``."""

    @staticmethod
    def forward(ctx, w_int, scale, axis: int, bits: int):
        shape = [1] * w_int.dim()
        shape[axis] = -1
        return w_int.to(scale.dtype) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w_int, scale, axis, bits):
        y = g.op(f"{DOMAIN}::WeightDQ", w_int, scale, axis_i=axis, bits_i=bits)
        y.setType(w_int.type().with_dtype(torch.float32))
        return y


@torch.no_grad()
def weight_integers(layer) -> torch.Tensor:
    """The integers a SoftQuant layer's hard forward rounds its weight to (int8, weight's shape):
    ``round_half_even(clamp(w * fp32(1/s), qn, qp))`` per output channel."""
    qn, qp = quant_grid(layer.w_bits, True)
    w = layer.weight_rows().detach().float()
    r = 1.0 / layer.w_scale.detach().float().reshape([-1] + [1] * (w.dim() - 1))
    return torch.round(torch.clamp(w * r, qn, qp)).to(torch.int8)


class _QuantShim(nn.Module):
    """Stands in for one SoftQuant layer during export: the same math, as placeholder nodes."""

    def __init__(self, layer):
        super().__init__()
        self.a_bits, self.w_bits, self.a_signed = layer.a_bits, layer.w_bits, layer.a_signed
        self.linear = isinstance(layer, SoftQuantLinear)
        # per-part FCs: integers as rows [P * C_out, C_in] (one step per row, DQ along axis 0),
        # reshaped to [P, C_in, C_out] after dequantizing; the product is a batched MatMul
        self.part = isinstance(layer, SoftQuantPartLinear)
        if self.part:
            self.part_shape = (layer.parts, layer.out_channels, layer.in_channels)
        w_int = weight_integers(layer)
        # MatMul takes [in, out]: store the transpose and dequantize along axis 1.
        self.register_buffer("w_int", w_int.t().contiguous() if self.linear else w_int)
        self.register_buffer("w_scale", layer.w_scale.detach().float().clone())
        self.register_buffer("a_scale", layer.a_scale.detach().float().reshape(()).clone())
        self.bias = None if layer.bias is None else layer.bias.detach().clone()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its parameters stay out

    def forward(self, x):
        if self.part:
            # Transpose first, so the activation's Q -> DQ feeds the MatMul directly
            # (onnxruntime 1.32's QDQ propagation mistypes a signed Q moved across a Transpose).
            x = x.permute(2, 0, 1)
            if self.a_bits is not None:
                x = _ActQDQ.apply(x, self.a_scale, self.a_bits, self.a_signed)
            P, co, ci = self.part_shape
            w = _WeightDQ.apply(self.w_int, self.w_scale, 0, self.w_bits)
            w = w.reshape(P, co, ci).permute(0, 2, 1)
            return torch.matmul(x, w).permute(1, 2, 0)
        if self.a_bits is not None:
            x = _ActQDQ.apply(x, self.a_scale, self.a_bits, self.a_signed)
        w = _WeightDQ.apply(self.w_int, self.w_scale, 1 if self.linear else 0, self.w_bits)
        if self.linear:
            y = torch.matmul(x, w)
            return y if self.bias is None else y + self.bias
        return self._layer._conv_forward(x, w, self.bias)


# ---------------------------------------------------------------------------------------------
# Model preparation: validation, swapping layers, forcing qgait ops onto their references.
# ---------------------------------------------------------------------------------------------
def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every SoftQuant layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SOFT_QUANT_MODULES)]


def _check_layers(layers):
    for name, m in layers:
        if m.mode != "hard":
            raise ValueError(
                f"qgait::{OP}: layer '{name}' is in {m.mode!r} mode, but ONNX export writes the "
                "hard forward (round half to even, what integer inference computes); call "
                "qgait.set_quant_mode(model, mode='hard') before exporting")
        if not bool(m.initialized):
            raise ValueError(
                f"qgait::{OP}: layer '{name}' has uninitialised steps; run a forward pass "
                "(or train / load a checkpoint) before exporting")
        if m.weight.dtype != torch.float32:
            raise TypeError(f"qgait::{OP}: layer '{name}' has {m.weight.dtype} weights; export "
                            "an fp32 model (model.float())")


def _swap(model: nn.Module, make, undo: list) -> None:
    """Replaces every SoftQuant child by ``make(child)``, appending what to put back to
    ``undo`` as it goes (so a failure half-way can still be undone)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, SOFT_QUANT_MODULES):
                parent._modules[name] = make(child)
                undo.append((parent, name, child))


@contextlib.contextmanager
def _export_mode(model: nn.Module):
    """Shims in, eval mode, qgait ops on their pure-PyTorch references; all undone on exit.

    The references trace to plain ONNX operators; the C++ / Triton ops would appear as unknown
    ``qgait::`` nodes. Functional calls follow ``QGAIT_BACKEND``, modules their ``backend``.
    Setting the environment variable is process-wide: do not run other qgait ops in other
    threads while exporting.
    """
    undo = []
    was_training = model.training
    backends = [(m, m.backend) for m in model.modules()
                if isinstance(getattr(m, "backend", None), (str, type(None)))
                and hasattr(m, "backend")]
    env = os.environ.get("QGAIT_BACKEND")
    try:
        _swap(model, _QuantShim, undo)
        model.eval()
        for m, _ in backends:
            m.backend = "reference"
        os.environ["QGAIT_BACKEND"] = "reference"
        yield
    finally:
        if env is None:
            os.environ.pop("QGAIT_BACKEND", None)
        else:
            os.environ["QGAIT_BACKEND"] = env
        for m, b in backends:
            m.backend = b
        for parent, name, child in undo:
            parent._modules[name] = child
        model.train(was_training)


class _Embeddings(nn.Module):
    """``x -> model(x)["embeddings"]`` (or the model's tensor / first output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return embeddings_of(self.model(x))


def embeddings_of(out) -> torch.Tensor:
    if isinstance(out, dict):
        if "embeddings" not in out:
            raise ValueError(f"qgait::{OP}: the model returned a dict without 'embeddings' "
                             f"(keys {sorted(out)})")
        return out["embeddings"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# ---------------------------------------------------------------------------------------------
# Lowering the placeholders to standard QDQ nodes.
# ---------------------------------------------------------------------------------------------
def _zp_type(container_bits: int, signed: bool):
    from onnx import TensorProto as TP
    return {(4, True): TP.INT4, (4, False): TP.UINT4,
            (8, True): TP.INT8, (8, False): TP.UINT8}[(container_bits, signed)]


def pack_int4(w: np.ndarray) -> bytes:
    """ONNX's INT4 layout: two's-complement nibbles, element 2i in the low nibble of byte i.
    (``helper.make_tensor`` without ``raw`` stores them as varint int32s: larger than int8.)"""
    u = (w.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] | (u[1::2] << 4)).tobytes()


def _lower(model_proto, int4_weights: bool, int4_acts: bool, opset: int) -> bool:
    """Replaces the qgait_export placeholders by Clip / QuantizeLinear / DequantizeLinear (in
    place) and sets the opset. ``int4_weights`` / ``int4_acts``: put grids of <= 4 bits in INT4
    / UINT4 containers. Returns whether any INT4 / UINT4 container was written."""
    _require_onnx()
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def value(name) -> np.ndarray:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        raise RuntimeError(f"qgait::{OP}: expected a constant for '{name}' (a step or weight)")

    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    new_inits, wrote_int4, nodes = [], False, []
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        a = attrs(node)
        base = node.name or node.output[0]
        bits = int(a["bits"])
        use_int4 = int4_acts if node.op_type == "ActQDQ" else int4_weights
        container = 4 if use_int4 and bits <= 4 else 8
        wrote_int4 |= container == 4
        if node.op_type == "ActQDQ":
            signed = bool(a["signed"])
            x, s_name = node.input
            s = np.float32(value(s_name).reshape(()))
            qn, qp = quant_grid(bits, signed)
            zp = helper.make_tensor(f"{base}/zero_point", _zp_type(container, signed), [], [0])
            new_inits.append(zp)
            if bits < container:
                # Narrow the container to the layer's grid; fp32 products as torch computes them.
                lo = numpy_helper.from_array(np.array(np.float32(qn) * s, np.float32),
                                             f"{base}/clip_min")
                hi = numpy_helper.from_array(np.array(np.float32(qp) * s, np.float32),
                                             f"{base}/clip_max")
                new_inits += [lo, hi]
                nodes.append(helper.make_node("Clip", [x, lo.name, hi.name], [f"{base}/clipped"],
                                              name=f"{base}/Clip"))
                x = f"{base}/clipped"
            nodes.append(helper.make_node("QuantizeLinear", [x, s_name, zp.name],
                                          [f"{base}/quantized"], name=f"{base}/QuantizeLinear"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{base}/quantized", s_name,
                                                               zp.name], list(node.output),
                                          name=f"{base}/DequantizeLinear"))
        elif node.op_type == "WeightDQ":
            axis = int(a["axis"])
            w_name, s_name = node.input
            w = value(w_name).astype(np.int8)
            channels = w.shape[axis]
            if container == 4:
                w_t = helper.make_tensor(f"{w_name}_int4", _zp_type(4, True), list(w.shape),
                                         pack_int4(w), raw=True)
            else:
                w_t = numpy_helper.from_array(w, f"{w_name}_int8")
            zp = helper.make_tensor(f"{base}/zero_point", _zp_type(container, True), [channels],
                                    [0] * channels)
            new_inits += [w_t, zp]
            nodes.append(helper.make_node("DequantizeLinear", [w_t.name, s_name, zp.name],
                                          list(node.output), name=f"{base}/DequantizeLinear",
                                          axis=axis))
        else:
            raise RuntimeError(f"qgait::{OP}: unknown placeholder {node.op_type}")

    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    real_inputs = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(real_inputs)
    # Drop the placeholders' inputs no node reads any more (the int8 copies of the weights).
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)

    ops = {n.op_type for n in graph.node}
    if opset > _TORCHSCRIPT_MAX_OPSET and ops & _CHANGED_IN_21:
        raise ValueError(f"qgait::{OP}: cannot raise this graph to opset {opset}: it holds "
                         f"{sorted(ops & _CHANGED_IN_21)}, whose semantics changed in opset 21; "
                         f"export with opset <= {_TORCHSCRIPT_MAX_OPSET} and int4=False")
    imports = [o for o in model_proto.opset_import if o.domain not in (DOMAIN, "", "ai.onnx")]
    del model_proto.opset_import[:]
    model_proto.opset_import.extend([helper.make_opsetid("", opset)] + imports)
    # Opset 21 (INT4) needs IR version 10.
    model_proto.ir_version = max(model_proto.ir_version, 10 if opset >= 21 else 8)
    return wrote_int4


# ---------------------------------------------------------------------------------------------
# INT4 support of the installed onnxruntime.
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def ort_int4_support() -> tuple[bool, str]:
    """``(ok, why)``: whether onnxruntime's CPU provider runs INT4 / UINT4 QuantizeLinear and
    per-channel INT4 DequantizeLinear (opset 21) correctly, probed on a tiny model."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto as TP
        from onnx import helper
    except ImportError as e:
        return False, f"onnx / onnxruntime not importable ({e})"
    x = np.array([-9.6, -8.5, -0.5, 0.5, 1.5, 2.4, 7.5, 15.5, 16.2], np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["qu"]),
             helper.make_node("DequantizeLinear", ["qu", "s", "zu"], ["yu"]),
             helper.make_node("QuantizeLinear", ["x", "s", "zi"], ["qi"]),
             helper.make_node("DequantizeLinear", ["qi", "s", "zi"], ["yi"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0)]
    w = np.arange(-8, 7).reshape(3, 5)
    ws = np.array([1.0, 0.5, 0.25], np.float32)
    g = helper.make_graph(
        nodes, "int4_probe", [helper.make_tensor_value_info("x", TP.FLOAT, [len(x)])],
        [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("yu", "yi", "wf")],
        [helper.make_tensor("s", TP.FLOAT, [], [1.0]),
         helper.make_tensor("zu", TP.UINT4, [], [0]), helper.make_tensor("zi", TP.INT4, [], [0]),
         helper.make_tensor("w", TP.INT4, [3, 5], w.reshape(-1).tolist()),
         helper.make_tensor("ws", TP.FLOAT, [3], ws.tolist()),
         helper.make_tensor("wz", TP.INT4, [3], [0, 0, 0])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", INT4_OPSET)], ir_version=10)
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        yu, yi, wf = sess.run(None, {"x": x})
    except Exception as e:  # noqa: BLE001 - any failure means "not supported here"
        return False, f"onnxruntime {ort.__version__} cannot run INT4 QDQ: {str(e)[:200]}"
    want_u = np.clip(np.rint(x), 0, 15)
    want_i = np.clip(np.rint(x), -8, 7)
    if not (np.array_equal(yu, want_u) and np.array_equal(yi, want_i)
            and np.array_equal(wf, w * ws[:, None])):
        return False, f"onnxruntime {ort.__version__} runs INT4 QDQ but with wrong results"
    return True, f"onnxruntime {ort.__version__} runs INT4 / UINT4 QDQ on the CPU"


def _ort_trial(proto, example) -> str | None:
    """None if onnxruntime (CPU, default optimizations) loads and runs ``proto`` on ``example``,
    else the reason (first line of its error)."""
    try:
        import onnxruntime as ort
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: example.detach().float().cpu().numpy()})
    except Exception as e:  # noqa: BLE001 - any failure means "use the next plan"
        return str(e).splitlines()[0][:300]
    return None


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------
def default_example(model: nn.Module, frames: int = 30, seed: int = 0) -> torch.Tensor:
    """A binary silhouette-like sequence ``[1, 1, frames, H, W]`` (H, W from
    ``model.input_hw`` when present, else 64 x 44): thresholded smooth noise, fixed seed."""
    H, W = getattr(model, "input_hw", (64, 44))
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, frames, H, W, generator=g)
    smooth = torch.nn.functional.avg_pool3d(noise, (1, 7, 7), 1, (0, 3, 3))
    return (smooth > 0.5).float()


def _parse_int4(int4, opset, layers) -> tuple[bool, str]:
    if int4 not in ("auto", True, False):
        raise ValueError(f"qgait::{OP}: int4 must be 'auto', True or False, got {int4!r}")
    narrow = any(m.w_bits <= 4 or (m.a_bits is not None and m.a_bits <= 4) for _, m in layers)
    if not narrow:
        return False, "no layer has a grid of 4 bits or fewer"
    if int4 is False:
        return False, "int4=False"
    if opset is not None and opset < INT4_OPSET:
        if int4 is True:
            raise ValueError(f"qgait::{OP}: INT4 containers need opset {INT4_OPSET}, got "
                             f"opset={opset}; pass opset=None or {INT4_OPSET}, or int4=False")
        return False, f"opset {opset} < {INT4_OPSET}"
    ok, why = ort_int4_support()
    if int4 is True:
        return True, why
    return ok, why


def export_onnx(model: nn.Module, path, example: torch.Tensor | None = None,
                opset: int | None = None, int4="auto", check: bool = True) -> dict:
    """Writes a QDQ ONNX model of a fake-quant qgait model (SoftQuant layers, hard mode).

    Args:
        model: an nn.Module whose forward takes ``x [N, 1, T, H, W]`` and returns a dict with
            ``"embeddings" [N, C, P]`` (or that tensor). Its SoftQuant layers must be in hard
            mode with initialised steps. A model without SoftQuant layers exports as plain fp32
            (with a warning).
        path: the .onnx file to write.
        example: ``[1, 1, T, H, W]`` float input used to trace and check (default:
            :func:`default_example`, T = 30). The T axis is dynamic in the graph.
        opset: 13..21; default 21 when INT4 containers are used, else 17.
        int4: "auto" (INT4 / UINT4 containers for grids of <= 4 bits where onnxruntime supports
            them: :func:`ort_int4_support`, then a trial run of this graph, trying INT4 weights
            + activations, then INT4 weights only; else 8-bit containers + Clip), True (INT4
            weights and activations, no fallback) or False (never; the portable form).
        check: run onnx's checker and onnxruntime on ``example`` and compare with the model.

    Returns:
        ``{"path", "opset", "int4": bool (any INT4 / UINT4 container), "int4_weights",
        "int4_activations", "bytes": file size, "max_abs_diff": float or None,
        "max_rel_diff": max_abs_diff / max|embeddings| or None, "quant_layers": int,
        "int4_why": str (why INT4 was or was not used)}``.

    Example:
        >>> info = export_onnx(model, "model.onnx")
        >>> info["max_abs_diff"] < 1e-3
    """
    onnx = _require_onnx()
    if not isinstance(model, nn.Module):
        raise TypeError(f"qgait::{OP}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, SOFT_QUANT_MODULES):
        raise TypeError(f"qgait::{OP}: pass a whole model (input [N, 1, T, H, W] -> embeddings), "
                        "not a single SoftQuant layer")
    if opset is not None and (not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET):
        raise ValueError(f"qgait::{OP}: opset must be an int in {MIN_OPSET}..{MAX_OPSET} "
                         f"(13: per-channel DequantizeLinear, 21: INT4), got {opset!r}")
    packed = [n for n, m in model.named_modules() if type(m).__name__ == "PackedConv3d"]
    if packed:
        raise TypeError(f"qgait::{OP}: layer '{packed[0]}' is a PackedConv3d (qgait.quant."
                        "convert's integer kernels); export the fake-quant model from before "
                        "convert(): the QDQ graph carries the same integers")
    layers = quant_layers(model)
    if not layers:
        warnings.warn(f"qgait::{OP}: the model has no SoftQuant layers; writing a plain fp32 "
                      "graph with no QuantizeLinear / DequantizeLinear (call qgait.quantize_ "
                      "and train first for a quantized export)", stacklevel=2)
    _check_layers(layers)
    use_int4, int4_why = _parse_int4(int4, opset, layers)
    opset = opset or (INT4_OPSET if use_int4 else PORTABLE_OPSET)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if example is None:
        example = default_example(model)
    if not isinstance(example, torch.Tensor) or example.dim() != 5 or example.shape[0] != 1 \
            or example.shape[1] != 1 or not example.is_floating_point():
        raise ValueError(f"qgait::{OP}: example must be a float tensor [1, 1, T, H, W], got "
                         f"{tuple(example.shape) if isinstance(example, torch.Tensor) else example!r}")
    example = example.to(device)

    buf = io.BytesIO()
    wrapper = _Embeddings(model)
    with _export_mode(model), torch.no_grad(), warnings.catch_warnings():
        # The tracer's warnings concern Python-side checks on static sizes (H, W, bins); T, the
        # one dynamic axis, only reaches operators that take any length (Conv, ReduceMax).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Our choice of the legacy exporter (module docstring) and torch's own use of a
        # deprecated helper inside it; neither is something a caller can act on.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        torch.onnx.export(wrapper, (example,), buf, dynamo=False,
                          opset_version=min(opset, _TORCHSCRIPT_MAX_OPSET),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {2: "T"}},
                          custom_opsets={DOMAIN: 1} if layers else None,
                          do_constant_folding=True,
                          # True skips torch's deduplication of equal initializers, which
                          # leaves dangling references in our placeholder nodes when two layers
                          # share a step value; _lower drops them from the inputs again.
                          keep_initializers_as_inputs=True)
    traced = buf.getvalue()
    # INT4 plans, best first. "auto" keeps the first one onnxruntime loads and runs with its
    # default (full) graph optimizations on this very graph: onnxruntime 1.32 accepts INT4 QDQ
    # but its optimizer drops the UINT4 Q/DQ around MaxPool and then has no uint4 MaxPool
    # kernel, so INT4 activations fail there while INT4 weights (the part that shrinks the
    # file) work.
    if not use_int4:
        plans = [(False, False)]
    elif int4 is True:
        plans = [(True, True)]
    else:
        plans = [(True, True), (True, False), (False, False)]
    refused = []
    for w4, a4 in plans:
        proto = onnx.load_from_string(traced)
        wrote_int4 = _lower(proto, w4, a4, opset)
        if len(plans) == 1 or not wrote_int4:
            break
        err = _ort_trial(proto, example)
        if err is None:
            break
        refused.append(f"INT4 {'weights + activations' if a4 else 'weights'}: {err}")
    if refused:
        int4_why += "; refused by onnxruntime on this graph: " + " | ".join(refused)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    onnx.save(proto, str(path))

    info = {"path": str(path), "opset": opset, "int4": wrote_int4, "bytes": path.stat().st_size,
            "int4_weights": wrote_int4 and w4, "int4_activations": wrote_int4 and a4,
            "max_abs_diff": None, "max_rel_diff": None, "quant_layers": len(layers),
            "int4_why": int4_why}
    if check:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                want = embeddings_of(model(example)).float().cpu()
        finally:
            model.train(was_training)
        from qgait.export.embedder import OnnxEmbedder
        got = OnnxEmbedder(path)(example.cpu())
        if got.shape != want.shape:
            raise RuntimeError(f"qgait::{OP}: onnxruntime returned {tuple(got.shape)}, the model "
                               f"{tuple(want.shape)}")
        diff = float((got - want).abs().max())
        info["max_abs_diff"] = diff
        info["max_rel_diff"] = diff / max(float(want.abs().max()), 1e-30)
    return info

"""Whole GaitLite3D per 30-frame sequence against what a user would run instead: torch fp32
eager, torch int8 (x86 / oneDNN backend), onnxruntime int8 (QOperator and QDQ) and qgait's packed
W8A8 / W4A8 / W4A4 models, timed in paired rounds in shuffled order.

    python bench/paired_peers_model.py [--widths 0.5 1.0] [--bits W8A8 W4A8 W4A4 W8A7] [--rounds 10]
    QGAIT_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/paired_peers_model.py  # AVX2 class
    python bench/paired_peers_model.py --checkpoint model.pt   # a trained fp model file
    python bench/paired_peers_model.py --warm 3   # each timed call after 3 of the same model

Every contender runs the same fp32 weights (one GaitLite3D, eval mode, BatchNorm statistics
perturbed; or the fp model of ``--checkpoint``, classifier head dropped) on the same binary
silhouette sequence ``[1, 1, T, 64, 44]`` and returns the embeddings ``[1, E, P]``:

* torch fp32: the model, eager (qgait's fused pooling op in the head, as every contender's
  head runs the same pooling in its own form).
* torch int8: PT2E (``prepare_pt2e`` / ``convert_pt2e`` with ``X86InductorQuantizer``) when
  torch or torchao provides it and it quantizes Conv3d; else FX graph mode static quantization
  (``torch.ao.quantization.quantize_fx``, the "x86" qconfig mapping and engine, which uses oneDNN /
  FBGEMM) of the conv trunk (stem .. stage3, Conv3d + BatchNorm folded), head in fp32. The line
  ``torch int8:`` says which one ran and why.
* onnxruntime int8: the fp32 model exported to ONNX (qgait.export.export_onnx: the pooling
  traced to plain ONNX ops), ``quant_pre_process``, then ``quantize_static`` (MinMax, per-channel
  int8 weights, uint8 activations) in QOperator and in QDQ format; both run with
  ORT_ENABLE_ALL and ``intra_op_num_threads`` = torch's thread count, and both are timed (the
  faster counts as the peer).
* qgait: ``quantize_`` (steps initialised on the calibration sequences in eval mode, so the
  BatchNorm statistics stay those of the fp model) then ``convert()``: the chained integer model.

All peers calibrate on the same few silhouette sequences (``--calib``, different from the timed
one). Every round runs every contender once, in an order shuffled from round to round (seeded),
so a loaded or drifting machine affects all alike and no contender always follows the same one
(a rotating order keeps each one's predecessor: qgait W4A4 always ran right after qgait W8A8,
whose buffers it reuses, and torch int8 after torch fp32); printed are the median time per
sequence, each embedding's cosine similarity to the torch fp32 one (the int8 peers are working int8 models, not
broken graphs), and for each qgait model the per-round ratio fastest peer / qgait (the fastest
peer by median, same run) against the issue's targets (W8A8 1.3x, W4A4 1.5x). Never asserted.

CPU classes: on an AVX-512 machine the AVX2 class is measured by capping qgait
(``QGAIT_CPU_ISA=avx2``) and torch's oneDNN (``ONEDNN_MAX_CPU_ISA=AVX2``). onnxruntime's kernels
(MLAS) pick their ISA at run time with no documented cap, so there its number is the AVX-512
one: an upper bound of its AVX2 speed (the ratio against it a lower bound). onnxruntime's
worker threads spin while a run is in progress (its default) but are stopped when it returns
(``session.force_spinning_stop``), so they do not steal cores from the next contender.
"""
import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import warnings

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_timing_args, cpu_class, timer  # noqa: E402

# W8A7: the activation precision torch's "x86" qconfig gives its int8 peer (HistogramObserver
# with reduce_range=True: codes 0..127, so that vpmaddubsw cannot saturate without VNNI); not
# in the default list, which compares qgait's exact 8-bit activations.
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W8A7": (8, 7)}
DEFAULT_BITS = ["W8A8", "W4A8", "W4A4"]
TARGETS = {"W8A8": 1.3, "W4A4": 1.5}
TRUNK = ("stem", "stage1", "pool1", "stage2", "stage3")


def _short(e: BaseException, n: int = 200) -> str:
    s = " ".join(f"{type(e).__name__}: {e}".split())
    return s if len(s) <= n else s[:n - 3] + "..."


# ----------------------------------------------------------------------------- the model
def _fp_model(width, checkpoint):
    """(fp32 GaitLite3D in eval mode without classifier head, description)."""
    if checkpoint:
        from qgait.model_io import load_model

        m, info = load_model(checkpoint)
        if info["kind"] != "fp":
            raise SystemExit(f"{checkpoint}: a {info['kind']} model; give an fp model file or "
                             "training checkpoint (every contender quantizes the same fp weights)")
        if type(m).__name__ != "GaitLite3D":
            raise SystemExit(f"{checkpoint}: a {type(m).__name__}, not a GaitLite3D")
        m.drop_classifier()   # embeddings only, like GaitLite3D(num_classes=0)
        return m.eval(), f"{checkpoint} (width {m.arch['width']}, {info['file']} file)"
    from qgait.models import GaitLite3D

    torch.manual_seed(0)
    m = GaitLite3D(num_classes=0, width=width)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm3d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
    return m.eval(), f"random weights, width {width}, BatchNorm statistics perturbed"


def _silhouettes(model, frames, calib):
    """(timed sequence, calibration sequences): binary silhouette-like [1, 1, T, H, W]."""
    from qgait.export.onnx import default_example

    return (default_example(model, frames, seed=0),
            [default_example(model, frames, seed=100 + i) for i in range(calib)])


def _emb(out):
    return out["embeddings"] if isinstance(out, dict) else out


# ----------------------------------------------------------------------------- torch int8
class _Int8Trunk(nn.Module):
    """GaitLite3D's forward with an int8 trunk (fp32 in, fp32 out) and its own fp32 head."""

    def __init__(self, model, trunk):
        super().__init__()
        self.model, self.qtrunk = model, trunk

    def forward(self, x):
        from qgait.ops import set_pool_hpp

        return self.model.fc(set_pool_hpp(self.qtrunk(x), None, self.model.bins))


def _pt2e_api():
    """(prepare_pt2e, convert_pt2e, quantizer module, source) or raises ImportError."""
    for base in ("torch.ao.quantization", "torchao.quantization.pt2e"):
        try:
            qp = __import__(f"{base}.quantize_pt2e", fromlist=["prepare_pt2e"])
            xq = __import__(f"{base}.quantizer.x86_inductor_quantizer", fromlist=["X"])
            return qp.prepare_pt2e, qp.convert_pt2e, xq, base
        except ImportError:
            continue
    raise ImportError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_pt2e "
                      "(moved to torchao) and torchao is not installed")


def _torch_int8_pt2e(model, calib, x):
    prepare_pt2e, convert_pt2e, xq, base = _pt2e_api()

    class Emb(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["embeddings"]

    gm = torch.export.export(Emb(copy.deepcopy(model)).eval(), (x,)).module()
    quantizer = xq.X86InductorQuantizer().set_global(
        xq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(gm, quantizer)
    for c in calib:
        prepared(c)
    q = convert_pt2e(prepared)
    n_conv = sum(1 for n in q.graph.nodes if n.op == "call_function"
                 and "conv3d" in str(n.target))
    n_dq = sum(1 for n in q.graph.nodes if n.op == "call_function"
               and "conv3d" in str(n.target) and any("dequantize" in str(a.target)
                                                     for a in n.all_input_nodes
                                                     if a.op == "call_function"))
    if n_dq == 0:
        raise RuntimeError(f"X86InductorQuantizer ({base}) left all {n_conv} Conv3d in fp32 "
                           "(it annotates conv1d / conv2d only)")
    # The converted graph runs reference quantize / dequantize ops in fp32; the x86 int8
    # kernels come from lowering: torchao's lower_pt2e_quantized_to_x86 (no code generation),
    # else torch.compile (inductor, freezing on).
    try:
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

        run, how = lower_pt2e_quantized_to_x86(q, (x,)), "lower_pt2e_quantized_to_x86"
    except ImportError:
        import torch._inductor.config as icfg

        icfg.freezing = True
        run, how = torch.compile(q), "torch.compile (inductor, freezing)"
    run(x)
    return run, f"PT2E X86InductorQuantizer ({base}), {n_dq}/{n_conv} Conv3d int8, {how}"


def _torch_int8_fx(model, calib, x):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    trunk = nn.Sequential(*[copy.deepcopy(getattr(model, n)) for n in TRUNK]).eval()
    for m in trunk.modules():
        if isinstance(m, nn.LeakyReLU):
            m.inplace = False   # quantized::leaky_relu has no in-place form (warns every call)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(trunk, get_default_qconfig_mapping("x86"), example_inputs=(x,))
        for c in calib:
            prepared(c)
        q = convert_fx(prepared)
    n_q = sum(1 for m in q.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
              and "Conv3d" in type(m).__name__)
    n_conv = sum(1 for m in trunk.modules() if isinstance(m, nn.Conv3d))
    n_bn = sum(1 for m in q.modules() if isinstance(m, nn.BatchNorm3d))
    if n_q == 0:
        raise RuntimeError("FX quantization left every Conv3d in fp32")
    return (_Int8Trunk(model, q).eval(),
            f"torch.ao FX graph mode static quantization, engine x86, qconfig mapping 'x86': "
            f"{n_q}/{n_conv} Conv3d int8 (per-channel weights), "
            f"{'BatchNorm folded' if n_bn == 0 else f'{n_bn} BatchNorm3d left unfolded'}, "
            "head fp32")


def _torch_int8(model, calib, x, how):
    """(callable x -> embeddings, description); tries PT2E then FX unless ``how`` names one."""
    why = []
    for name, build in (("pt2e", _torch_int8_pt2e), ("fx", _torch_int8_fx)):
        if how not in ("auto", name):
            continue
        try:
            m, desc = build(model, calib, x)
            if why:
                desc += "; not " + "; not ".join(why)
            return m, desc
        except Exception as e:  # noqa: BLE001 - reported, the next way is tried
            why.append(f"{name}: {_short(e)}")
    raise RuntimeError("; ".join(why))


# ----------------------------------------------------------------------------- onnxruntime
def _ort_int8(model, calib, x, threads, workdir):
    """[(label, run() -> embeddings of x, note)] for QOperator and QDQ; a failure as
    (label, None, why)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    from qgait.export import export_onnx
    from qgait.export.onnx import INPUT_NAME

    fp_path = os.path.join(workdir, "fp32.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "no SoftQuant layers; writing a plain fp32 graph"
        export_onnx(copy.deepcopy(model), fp_path, example=calib[0], check=False)
    src, pre = fp_path, "no quant_pre_process"
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre_path = os.path.join(workdir, "fp32_pre.onnx")
        quant_pre_process(fp_path, pre_path)
        src, pre = pre_path, "quant_pre_process"
    except Exception as e:  # noqa: BLE001 - the raw export quantizes too
        pre = f"quant_pre_process failed ({_short(e, 120)}), raw export"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{INPUT_NAME: c.numpy()} for c in calib])

        def get_next(self):
            return next(self.it, None)

    feed = {INPUT_NAME: np.ascontiguousarray(x.numpy())}

    def session(path, dump=None):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.force_spinning_stop", "1")
        so.log_severity_level = 4   # a refused graph raises (and is reported) anyway
        if dump:
            so.optimized_model_filepath = dump
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        sess.run(None, feed)   # raises here if a kernel refuses the graph

        def run():
            return sess.run(None, feed)[0]
        return run

    # The per-part FCs are one batched MatMul [P, N, C] @ [P, C, E]: per-channel quantization
    # gives its weight a [P, 1, E] zero point, which ORT's QLinearMatMul refuses at run time
    # (1.32); then it is left in fp32 (the peers' heads run once per sequence, as qgait's).
    matmuls = [n.name for n in onnx.load(src).graph.node if n.op_type == "MatMul"]
    out = []
    for fmt in ("QOperator", "QDQ"):
        label = f"onnxruntime int8 {fmt}"
        try:
            path = os.path.join(workdir, f"int8_{fmt}.onnx")
            excl, note = [], ""
            for attempt in range(2):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_static(src, path, Reader(), quant_format=getattr(QuantFormat, fmt),
                                    per_channel=True, activation_type=QuantType.QUInt8,
                                    weight_type=QuantType.QInt8, nodes_to_exclude=excl)
                try:
                    # the graph after optimization, written by a session of its own (the timed
                    # one is built exactly as a user would, without the dump)
                    session(path, dump=path + ".optimized.onnx")
                    run = session(path)
                    break
                except Exception as e:  # noqa: BLE001
                    if attempt or not matmuls:
                        raise
                    excl = matmuls
                    note = ("; MatMul (per-part FCs) left fp32, quantized it failed: "
                            f"{_short(e, 150)}")
            graphs = []
            for p in (path, path + ".optimized.onnx"):
                ops = {}
                try:
                    for n in onnx.load(p).graph.node:
                        ops[n.op_type] = ops.get(n.op_type, 0) + 1
                except Exception as e:  # noqa: BLE001 - only a description
                    graphs.append(f"unreadable ({_short(e, 80)})")
                    continue
                graphs.append(", ".join(f"{k} {v}" for k, v in sorted(ops.items())
                                        if "Integer" in k or k.startswith(
                                            ("QLinear", "QuantizeLinear", "DequantizeLinear")))
                              or "no integer ops")
            out.append((label, run, f"{pre}; quantize_static MinMax, per-channel s8 weights, u8 "
                                    f"activations; graph: {graphs[0]}; after ORT_ENABLE_ALL: "
                                    f"{graphs[1]}{note}"))
        except Exception as e:  # noqa: BLE001 - reported, the other format still runs
            out.append((label, None, _short(e)))
    return out


# ----------------------------------------------------------------------------- qgait
def _qgait(model, calib, w_bits, a_bits):
    from qgait.quant import QuantConfig, convert, quantize_

    q = copy.deepcopy(model)
    quantize_(q, QuantConfig(w_bits=w_bits, a_bits=a_bits))
    q.eval()
    q(torch.cat(calib))   # eval mode: initialises the steps, BatchNorm statistics untouched
    return convert(q)


# ----------------------------------------------------------------------------- main
def _cos(a, b) -> float:
    a, b = torch.as_tensor(a).flatten().double(), torch.as_tensor(b).flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _contenders(model, x, calib, args, threads, workdir):
    """[(label, kind 'peer' | 'qgait', fn)]; unavailable ones are reported and skipped."""
    runs = [("torch fp32 eager", "peer", lambda: _emb(model(x)))]
    try:
        m8, desc = _torch_int8(model, calib, x, args.torch_int8)
        print(f"  torch int8: {desc}")
        runs.append(("torch int8 x86", "peer", lambda: _emb(m8(x))))
    except Exception as e:  # noqa: BLE001
        print(f"  torch int8: not run ({_short(e, 400)})")
    try:
        import onnxruntime  # noqa: F401
        for label, fn, note in _ort_int8(model, calib, x, threads, workdir):
            if fn is None:
                print(f"  {label}: not run ({note})")
            else:
                print(f"  {label}: {note}")
                runs.append((label, "peer", fn))
    except Exception as e:  # noqa: BLE001
        print(f"  onnxruntime int8: not run ({_short(e)})")
    for bits in args.bits:
        label = f"qgait {bits} packed"
        try:
            q = _qgait(model, calib, *BITS[bits])
            runs.append((label, "qgait", (lambda q=q: _emb(q(x)))))
        except Exception as e:  # noqa: BLE001
            print(f"  {label}: not run ({_short(e)})")
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="+", type=float, default=[0.5, 1.0])
    ap.add_argument("--bits", nargs="+", default=DEFAULT_BITS, choices=list(BITS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--warm", type=int, default=0,
                    help="untimed calls of the same contender before each timed one (default 0: "
                         "every timed call follows another contender, caches cold to it; K > 0: "
                         "the steady state of a model embedding sequence after sequence)")
    ap.add_argument("--calib", type=int, default=4, help="calibration sequences (default 4)")
    ap.add_argument("--checkpoint", default=None,
                    help="a trained fp GaitLite3D (model file or training checkpoint, read with "
                         "qgait.model_io.load_model) instead of random weights; --widths is "
                         "then ignored")
    ap.add_argument("--torch-int8", choices=["auto", "pt2e", "fx"], default="auto",
                    help="how torch's int8 model is built (auto: PT2E if it quantizes Conv3d, "
                         "else FX)")
    add_timing_args(ap)
    args = ap.parse_args(argv)
    _time = timer(args)
    threads = torch.get_num_threads()
    try:
        import onnxruntime as ort
        ort_v = f"onnxruntime {ort.__version__}"
    except ImportError:
        ort_v = "onnxruntime not installed"
    print(f"CPU class: {cpu_class()}")
    print(f"clock {args.clock}, load average {os.getloadavg()[0]:.1f}")
    print(f"torch {torch.__version__}, {ort_v}, {threads} threads (torch and onnxruntime "
          f"intra-op), {args.rounds} rounds, one {args.frames}-frame sequence, {args.calib} calibration "
          f"sequences" + (f", {args.warm} untimed calls before each timed one" if args.warm
                          else ""))
    caps = [v for v in ("QGAIT_CPU_ISA", "ONEDNN_MAX_CPU_ISA") if os.environ.get(v)]
    if caps:
        who = {"QGAIT_CPU_ISA": "qgait", "ONEDNN_MAX_CPU_ISA": "torch (oneDNN)"}
        print(f"note: {', '.join(f'{v}={os.environ[v]}' for v in caps)} caps "
              f"{' and '.join(who[v] for v in caps)}; onnxruntime (MLAS) has no documented ISA "
              "cap and runs the best ISA of this CPU: on an AVX-512 machine its number is the "
              "AVX-512 one (an upper bound of its AVX2 speed, the ratio against it a lower bound)")
        if len(caps) == 1:
            print("note: for the AVX2 class set both QGAIT_CPU_ISA=avx2 and "
                  "ONEDNN_MAX_CPU_ISA=AVX2 (one side alone is capped now)")
    widths = [None] if args.checkpoint else args.widths
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="qgait_peers_") as tmp:
        for width in widths:
            model, desc = _fp_model(width, args.checkpoint)
            name = f"width {model.arch['width']:g}"
            print(f"{name}: {desc}")
            x, calib = _silhouettes(model, args.frames, args.calib)
            workdir = os.path.join(tmp, name.replace(" ", "_"))
            os.makedirs(workdir)
            runs = _contenders(model, x, calib, args, threads, workdir)
            ref = runs[0][2]()
            cos = {}
            for label, kind, fn in list(runs):
                try:
                    fn(), fn()   # warm-up (onnxruntime's arena, oneDNN's primitive caches)
                    cos[label] = _cos(fn(), ref)
                except Exception as e:  # noqa: BLE001 - reported, the others still run
                    print(f"  {label}: not run ({_short(e)})")
                    runs.remove((label, kind, fn))
            t = {label: [] for label, _, _ in runs}
            order = random.Random(0)
            for _ in range(args.rounds):
                for label, _, fn in order.sample(runs, len(runs)):
                    for _ in range(args.warm):
                        fn()
                    t[label].append(_time(fn))
            med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
            for label, kind, _ in runs:
                v = sorted(t[label])
                print(f"  {name} {label:<28s} {med[label]:8.2f} ms (range {v[0] * 1e3:.2f}-"
                      f"{v[-1] * 1e3:.2f}), cosine to fp32 {cos[label]:.6f}", flush=True)
            peers = [label for label, kind, _ in runs if kind == "peer"]
            best = min(peers, key=med.get)
            for label, kind, _ in runs:
                if kind != "qgait":
                    continue
                bits = label.split()[1]
                r = sorted(p / q for p, q in zip(t[best], t[label]))
                each = ", ".join(f"{p} {med[p] / med[label]:.2f}x" for p in peers)
                target = TARGETS.get(bits)
                verdict = "" if target is None else \
                    f"; target {target}x: {'met' if statistics.median(r) >= target else 'not met'}"
                print(f"ratio {name} {bits}: fastest peer ({best}, {med[best]:.2f} ms) / qgait "
                      f"{med[label]:.2f} ms per round median {statistics.median(r):.2f}x (range "
                      f"{r[0]:.2f}-{r[-1]:.2f}){verdict}; medians vs each peer: {each}",
                      flush=True)


if __name__ == "__main__":
    main()

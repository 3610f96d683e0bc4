"""``qgait export-onnx CKPT --out model.onnx``: the glue between a training checkpoint and
:func:`qgait.export.export_onnx`.

Wiring (in qgait/cli.py)::

    @command("export-onnx", "export a checkpoint as a QDQ ONNX model (onnxruntime-ready)")
    def _export_onnx(p):
        from qgait.export.cli import add_export_onnx_args, main_export_onnx
        add_export_onnx_args(p)
        return lambda args, rest: main_export_onnx(args, rest)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_export_onnx_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", help="a checkpoint written by qgait train (fake-quant stage)")
    p.add_argument("--out", help="the .onnx file (default: the checkpoint's path with .onnx)")
    p.add_argument("--opset", type=int, default=None,
                   help="13..21 (default: 21 with INT4 containers, else 17)")
    p.add_argument("--int4", default="auto", choices=["auto", "on", "off"],
                   help="INT4/UINT4 containers for grids of <= 4 bits (auto: where onnxruntime "
                        "runs them; off: portable 8-bit containers + Clip)")
    p.add_argument("--frames", type=int, default=30, help="frames of the example sequence")
    p.add_argument("--hard", action="store_true",
                   help="switch soft-mode layers to the hard forward first (deployment rounds)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the onnx checker and the onnxruntime comparison")
    return p


def main_export_onnx(args: argparse.Namespace, rest=None) -> int:
    """Loads ``args.checkpoint`` (a checkpoint or model file, see :mod:`qgait.model_io`),
    exports it and prints the result (also written as JSON next to the .onnx). Returns the
    exit status."""
    from qgait.errors import UserError
    if rest:
        raise UserError(f"unknown arguments {' '.join(rest)} (see qgait export-onnx --help)")
    from qgait.export.onnx import default_example, export_onnx
    from qgait.model_io import atomic_write_text, load_model
    from qgait.quant import set_quant_mode

    model, minfo = load_model(args.checkpoint)
    if minfo["kind"] == "packed":
        raise UserError(f"{args.checkpoint}: is a packed (converted) model; export the "
                        "fake-quant checkpoint it was converted from")
    cfg = minfo["config"] or {}
    if args.hard:
        set_quant_mode(model, mode="hard")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx")
    int4 = {"auto": "auto", "on": True, "off": False}[args.int4]
    info = export_onnx(model, out, example=default_example(model, args.frames),
                       opset=args.opset, int4=int4, check=not args.no_check)
    info["checkpoint"] = str(args.checkpoint)
    info["stage"] = cfg.get("stage", minfo["kind"])
    diff = ("" if info["max_abs_diff"] is None else
            f", max |onnxruntime - torch| {info['max_abs_diff']:.3g} "
            f"({info['max_rel_diff']:.3g} of max |embedding|)")
    print(f"wrote {out}: opset {info['opset']}, {info['quant_layers']} quantized layers, "
          f"int4 {info['int4']} ({info['int4_why']}), {info['bytes'] / 1e6:.2f} MB{diff}")
    atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2))
    return 0

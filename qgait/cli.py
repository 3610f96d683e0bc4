"""The ``qgait`` command line: ``qgait <command> ...``.

Commands register themselves in :data:`COMMANDS` through :func:`command`; adding one (demo,
pipeline, convert, export-onnx, embed, ...) is a decorated function taking the subparser
and returning the handler.

A user's mistake (a missing or unreadable file, an unknown config key, an empty data folder:
:class:`qgait.errors.UserError`, :class:`qgait.data.DataError`) ends the command with one
line on stderr, ``qgait <command>: error: ...`` naming the file or key and what to do, and exit
status 2, before anything is written; ``--debug`` (or ``QGAIT_DEBUG=1``) shows the traceback.
Model files are read by :mod:`qgait.model_io`; ``--trust-legacy-file`` lets a command read
the pickled files of older qgait versions (docs/model_files.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from qgait.errors import UserError

COMMANDS: dict[str, tuple[str, Callable]] = {}


def command(name: str, help: str):
    """Registers ``setup(parser) -> handler(args) -> int`` as subcommand ``name``."""
    def deco(setup):
        COMMANDS[name] = (help, setup)
        return setup
    return deco


# ----------------------------------------------------------------------------- train
@command("train", "train a model from a config (qgait/configs/<name>.yaml or a path)")
def _train(p: argparse.ArgumentParser):
    p.add_argument("--config", required=True, help="config name (e.g. casia_b_fp) or YAML path")
    p.add_argument("--stage", choices=["fp", "qat", "soft"],
                   help="QGait stage: fp (stage 0), qat (stage 1, straight-through), soft "
                        "(stage 2, soft quantizer + IDC); overrides the config's stage")
    p.add_argument("--data", help="data root (overrides data.root)")
    p.add_argument("--out", help="output folder (overrides train.out_dir)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="checkpoint to resume from (no value: OUT/last.pt if it exists)")
    p.epilog = "Any other --dotted.key value pair overrides the config, e.g. --optim.lr 0.05"

    def run(args, rest):
        from qgait.train import load_config, run_training
        from qgait.train.config import parse_overrides
        over = parse_overrides(rest)
        if args.data:
            over.setdefault("data", {})["root"] = args.data
        if args.stage:
            over["stage"] = args.stage
        if args.out:
            over.setdefault("train", {})["out_dir"] = args.out
        cfg = load_config(args.config, over)
        run_training(cfg, resume=args.resume)
        return 0
    return run


# ----------------------------------------------------------------------------- eval
@command("eval", "evaluate a checkpoint (CASIA-B tables, rank-k / mAP / mINP)")
def _eval(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint (qgait train / pipeline: fp or fake-quant), a packed model "
                        "(qgait convert), an ONNX model (qgait export-onnx) or a shipped model "
                        "zoo:NAME (python -m qgait.zoo list)")
    p.add_argument("--config", help="data config for an ONNX model (default casia_b_fp)")
    p.add_argument("--data", help="data root (default: the checkpoint config's data.root)")
    p.add_argument("--ids", nargs=2, metavar=("FIRST", "LAST"),
                   help="test subject id range (default: the config's data.test_ids)")
    p.add_argument("--protocol", default="casia-b", choices=["casia-b", "generic"])
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--max-frames", type=int, default=None, help="frames per test batch")
    p.add_argument("--min-frames", type=int, default=0,
                   help="also report the tables without sequences shorter than this")
    p.add_argument("--json", help="write the results here (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true")

    def run(args, rest):
        if rest:
            raise UserError(f"unknown arguments {' '.join(rest)} (see qgait eval --help)")
        import torch

        from qgait.evaluation import evaluate, model_embed_fn
        from qgait.model_io import atomic_write_text, file_sha256, load_any
        from qgait.train.build import load_dataset
        from qgait.train.trainer import resolve_amp
        model, info = load_any(args.checkpoint)
        is_onnx = info["kind"] == "onnx"
        cfg = info["config"]
        if cfg is None:
            from qgait.train import load_config
            cfg = load_config(args.config or "casia_b_fp")
        if args.data:
            cfg["data"]["root"] = args.data
        if args.ids:
            cfg["data"]["test_ids"] = list(args.ids)
        # a shipped model (zoo:NAME) is read from the package: its results go to the cwd
        model_file = Path(info["source"]) if info.get("zoo") else Path(args.checkpoint)
        default_out = (Path(f"zoo-{info['zoo']['name']}.eval.json") if info.get("zoo")
                       else model_file.with_suffix(".eval.json"))
        out = Path(args.json) if args.json else default_out
        device = torch.device("cuda" if torch.cuda.is_available() and not is_onnx else "cpu")
        # quantized models (fake-quant, packed, ONNX) are evaluated in fp32 by default: an
        # autocast would round their exact fake-quant values to bf16
        quantized = info["kind"] != "fp"
        amp = None if (quantized and args.amp == "auto") else resolve_amp(args.amp, device)
        if is_onnx:
            def fn(x, seqL):
                return model(x, seqL)["embeddings"].float()
        else:
            model = model.to(device)
            if amp is not None and device.type == "cpu":
                model = model.to(memory_format=torch.channels_last_3d)
        ds = load_dataset(cfg, "test", progress=not args.no_progress)
        if not is_onnx:
            fn = model_embed_fn(model, device, amp,
                                channels_last=amp is not None and device.type == "cpu")
        res = evaluate(fn, ds, args.protocol,
                       max_frames=args.max_frames or cfg["eval"]["max_frames"],
                       progress=not args.no_progress, min_frames=args.min_frames)
        res["checkpoint"], res["step"] = str(args.checkpoint), info.get("step")
        res["model_sha256"], res["model_kind"] = file_sha256(model_file), info["kind"]
        res["amp"] = str(amp)
        res["precision"] = precision_label(amp, device)
        import qgait
        res["qgait_version"] = qgait.__version__
        _print_results(res)
        if "filtered" in res:
            f = res["filtered"]
            print(f"\nwithout the {len(f['excluded'])} sequence(s) shorter than "
                  f"{f['min_frames']} frames: {', '.join(f['excluded'])}")
            _print_results(f)
        print(f"{res['n_sequences']} sequences in {res['seconds']:.1f} s ({res['precision']})")
        atomic_write_text(out, json.dumps(res, indent=2))
        print(f"wrote {out}")
        return 0
    return run


def precision_label(amp_dtype, device) -> str:
    """How a model ran: "fp32", or "bf16 autocast (cpu)" and the like."""
    if amp_dtype is None:
        return "fp32"
    import torch
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype))
    return f"{name} autocast ({getattr(device, 'type', device)})"


def _print_results(res):
    from qgait.evaluation import format_casia_b
    if "casia_b" in res:
        print(format_casia_b(res["casia_b"]))
    g = res["generic"]
    print("generic: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in g.items()))


# ----------------------------------------------------------------------------- data
@command("data", "data tools: import-png (raw silhouette PNG tree -> OpenGait pickles)")
def _data(p: argparse.ArgumentParser):
    p.add_argument("action", choices=["import-png"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="the action's own arguments")

    def run(args, rest):
        try:
            from qgait.data import import_png
        except ImportError as e:
            raise UserError(f"qgait.data.import_png is unavailable ({e}); pip install pillow")
        try:
            return import_png.main(list(args.args) + list(rest)) or 0
        except FileNotFoundError as e:   # the PNG tree is missing
            raise UserError(f"{e}; give the root of a silhouette PNG tree "
                            "<root>/<subject>/<condition>/<view>/*.png") from e
    return run


# ----------------------------------------------------------------------------- info
@command("info", "backends available here and the default model's summary")
def _info(p: argparse.ArgumentParser):
    p.add_argument("--config", default=None, help="summarise this config's model")

    def run(args, rest):
        import qgait
        from qgait.models import build_model
        from qgait.train import load_config
        cfg = load_config(args.config, parse_rest(rest))
        print(f"qgait {qgait.__version__}")
        for name, b in qgait.backends().items():
            print(f"  {name:<10s} {'yes' if b['available'] else 'no ':<4s} {b['why']}")
        m = cfg["model"]
        build_model(m["name"], num_classes=50, width=m["width"], embed_dim=m["embed_dim"],
                    bins=tuple(m["bins"]), scale=m["scale"]).summary()
        return 0
    return run


# ----------------------------------------------------------------------------- QGait pipeline
@command("export-onnx", "a quantized checkpoint -> a QDQ ONNX model (onnxruntime-ready)")
def _export_onnx(p: argparse.ArgumentParser):
    from qgait.export.cli import add_export_onnx_args, main_export_onnx
    add_export_onnx_args(p)
    return lambda args, rest: main_export_onnx(args, rest)


@command("demo", "the QGait pipeline end to end on built-in synthetic data (CPU, ~5 min)")
def _demo(p: argparse.ArgumentParser):
    p.add_argument("--out", default="runs/demo", help="output folder (resumes if it exists)")
    p.add_argument("--data", help="an OpenGait pickle tree instead of the synthetic one "
                   "(then set --data.train_ids / --data.test_ids for its split)")
    p.add_argument("--fast", action="store_true", help="a tiny run in well under a minute")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true")

    def run(args, rest):
        from qgait.pipeline.demo import run_demo
        run_demo(args.out, args.data, args.fast, threads=args.threads,
                 progress=not args.no_progress, overrides=parse_rest(rest))
        return 0
    return run


@command("pipeline", "fp -> stage 1 (QAT) -> stage 2 (soft + IDC) for each variant, resumable")
def _pipeline(p: argparse.ArgumentParser):
    p.add_argument("--config", required=True, help="config name or YAML path (with a pipeline: "
                   "section)")
    p.add_argument("--out", required=True, help="output folder; finished stages are skipped")
    p.add_argument("--data", help="data root (overrides data.root)")
    p.add_argument("--variants", nargs="+", help="variants to build (default: the config's); "
                   "known: w8a8 w4a4 w4a4-ste w4a4-soft1 w4a4-noidc")
    p.add_argument("--fp-checkpoint", help="start from this fp checkpoint instead of stage 0")
    p.add_argument("--report", action="store_true",
                   help="then print the results table (rank-1, packed bytes, CPU latency) and "
                        "write OUT/report.json and OUT/report.png")

    def run(args, rest):
        from qgait.pipeline.run import run_pipeline
        cfg = _config_with_data(args, rest)
        done = run_pipeline(cfg, args.out, args.variants, fp_checkpoint=args.fp_checkpoint)
        for k, v in done.items():
            print(f"{k:<12s} {v}")
        if args.report:
            from qgait.pipeline.demo import report
            report(done, cfg, args.out)
        return 0
    return run


@command("study", "LSQ vs QGait's method over bit widths and seeds, with bootstrap intervals")
def _study(p: argparse.ArgumentParser):
    p.add_argument("--config", required=True, help="pipeline config (stage lengths, data split)")
    p.add_argument("--out", required=True, help="output folder; finished runs are skipped")
    p.add_argument("--fp-checkpoint", help="the fp teacher (default: train it under OUT/fp)")
    p.add_argument("--data", help="data root (overrides data.root)")
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3], help="W=A bit widths")
    p.add_argument("--methods", nargs="+", default=["ste", "soft1", "noidc", "idc"],
                   choices=["ste", "soft1", "noidc", "idc"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--no-progress", action="store_true")
    p.epilog = ("Any other --dotted.key value pair overrides the config, e.g. "
                "--data.test_ids [041,050] to tune on a validation split")

    def run(args, rest):
        from qgait.pipeline.study import run_study
        cfg = _config_with_data(args, rest)
        run_study(cfg, args.out, args.fp_checkpoint, bits=args.bits, methods=args.methods,
                  seeds=args.seeds, n_boot=args.n_boot, progress=not args.no_progress)
        return 0
    return run


@command("convert", "a quantized checkpoint -> a packed int8/int4 inference model file")
def _convert(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="a qat/soft checkpoint written by qgait train/pipeline, "
                   "or a fake-quant model file")
    p.add_argument("--out", required=True, help="where to write the packed model (.pt)")

    def run(args, rest):
        if rest:
            raise UserError(f"unknown arguments {' '.join(rest)} (see qgait convert --help)")
        import copy

        import torch

        from qgait.model_io import file_sha256, load_model, save_model
        from qgait.pipeline.demo import inference_nbytes, max_embedding_diff
        from qgait.quant import convert
        model, info = load_model(args.checkpoint)
        if info["kind"] != "fakequant":
            raise UserError(f"{args.checkpoint}: is a {info['kind']} model; convert the "
                            "checkpoint of stage qat or soft (a fake-quant model)")
        packed = convert(copy.deepcopy(model).eval())
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(1, 1, 30, 64, 44, generator=g) > 0.5).float()
        diff = max_embedding_diff(model, packed, x)
        meta = {"source": str(args.checkpoint), "source_sha256": file_sha256(args.checkpoint),
                "step": info.get("step"), "fakequant_vs_packed_rel_diff_30_frames": diff}
        save_model(packed, args.out, meta, config=info["config"])
        print(f"packed model: {inference_nbytes(packed):,d} bytes (fake-quant fp32 model "
              f"{inference_nbytes(model):,d}); embeddings vs fake-quant: max relative "
              f"difference {diff:.2e}; wrote {args.out}")
        return 0 if diff < 1e-3 else 1
    return run


@command("embed", "print or save the embedding of one silhouette sequence")
def _embed(p: argparse.ArgumentParser):
    p.add_argument("model", help="a checkpoint, a model file, an ONNX model or zoo:NAME (a "
                   "shipped model: python -m qgait.zoo list)")
    p.add_argument("sequence", help="a folder of silhouette PNGs, or an OpenGait .pkl/.pkl.gz")
    p.add_argument("--save", help="write the embedding [C, P] here (.npy)")

    def run(args, rest):
        if rest:
            raise UserError(f"unknown arguments {' '.join(rest)} (see qgait embed --help)")
        import numpy as np
        import torch

        from qgait.data.pickle_io import load_pickle
        from qgait.model_io import load_any
        seq = Path(args.sequence)
        if not seq.exists():
            raise UserError(f"{seq}: no such file or folder; give a folder of silhouette PNGs "
                            "or an OpenGait .pkl / .pkl.gz")
        if seq.is_dir():
            from qgait.data.import_png import load_png_sequence
            frames = load_png_sequence(seq)
        else:
            frames = load_pickle(seq)
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.shape[1:] not in ((64, 64), (64, 44)):
            raise UserError(f"{seq}: expected frames [T, 64, 64] or [T, 64, 44], got "
                            f"{frames.shape}")
        if frames.shape[2] == 64:
            frames = frames[:, :, 10:54]
        x = torch.from_numpy((frames > 127 if frames.max() > 1 else frames > 0)
                             .astype(np.float32))[None, None]
        model, _ = load_any(args.model)
        with torch.inference_mode():
            e = model(x)["embeddings"][0].float()
        if args.save:
            import io

            from qgait.model_io import atomic_write_bytes
            buf = io.BytesIO()
            np.save(buf, e.numpy())
            atomic_write_bytes(args.save, buf.getvalue())
            print(f"wrote {args.save} {tuple(e.shape)}")
        else:
            torch.set_printoptions(precision=4, threshold=64)
            print(f"embedding {tuple(e.shape)} (channels x parts):\n{e}")
        return 0
    return run


def parse_rest(rest):
    from qgait.train.config import parse_overrides
    return parse_overrides(rest) if rest else None


def _config_with_data(args, rest) -> dict:
    """``--config`` loaded with ``--data`` (data.root) and the ``--dotted.key`` overrides."""
    from qgait.train import load_config
    over = parse_rest(rest) or {}
    if args.data:
        over.setdefault("data", {})["root"] = args.data
    return load_config(args.config, over)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_GLOBAL_FLAGS = {
    "--debug": "show the Python traceback of an error (also: environment QGAIT_DEBUG=1)",
    "--trust-legacy-file": "read model files of older qgait versions (pickled modules and "
                           "checkpoints) with the full unpickler, which can run code: only "
                           "for files you trust (docs/model_files.md)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qgait", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help, setup) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(_handler=setup(sp))
        for flag, text in _GLOBAL_FLAGS.items():
            sp.add_argument(flag, action="store_true", help=text)
    return parser


def _pop_flag(argv: list, flag: str) -> bool:
    found = flag in argv
    while flag in argv:
        argv.remove(flag)
    return found


def user_error_types() -> tuple:
    """Exceptions that are the user's to fix: printed as one line, exit status 2."""
    from qgait.data.pickle_io import DataError
    return (UserError, DataError)


def main(argv=None) -> int:
    """Entry point of the ``qgait`` console script; returns the exit status (2: a user error,
    reported on one stderr line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # global flags, anywhere on the line (also after data import-png's own arguments)
    debug = _pop_flag(argv, "--debug") or os.environ.get("QGAIT_DEBUG", "") not in ("", "0")
    trust = _pop_flag(argv, "--trust-legacy-file")
    parser = build_parser()
    # data import-png passes its own options through; other commands take --dotted overrides.
    args, rest = parser.parse_known_args(argv)
    from qgait._malloc import keep_freed_memory
    keep_freed_memory()   # 1.5x faster CPU training steps (see qgait/_malloc.py)
    from qgait.model_io import trusting_legacy_files
    try:
        with trusting_legacy_files(trust):
            return int(args._handler(args, rest) or 0)
    except user_error_types() as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"qgait {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

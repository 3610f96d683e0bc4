"""The ``qgait`` command line: ``qgait <command> ...``.

Commands register themselves in :data:`COMMANDS` through :func:`command`; adding one (demo,
pipeline, convert, export-onnx, embed, ...) is a decorated function taking the subparser
and returning the handler.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

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
        if args.out:
            over.setdefault("train", {})["out_dir"] = args.out
        cfg = load_config(args.config, over)
        run_training(cfg, resume=args.resume)
        return 0
    return run


# ----------------------------------------------------------------------------- eval
@command("eval", "evaluate a checkpoint (CASIA-B tables, rank-k / mAP / mINP)")
def _eval(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by qgait train")
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
            raise SystemExit(f"qgait eval: unknown arguments {rest}")
        import torch
        from qgait.evaluation import evaluate, model_embed_fn
        from qgait.train.build import load_dataset
        from qgait.train.trainer import resolve_amp
        model, cfg, step = load_checkpoint_model(args.checkpoint)
        if args.data:
            cfg["data"]["root"] = args.data
        if args.ids:
            cfg["data"]["test_ids"] = list(args.ids)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        amp = resolve_amp(args.amp, device)
        model = model.to(device)
        if amp is not None and device.type == "cpu":
            model = model.to(memory_format=torch.channels_last_3d)
        ds = load_dataset(cfg, "test", progress=not args.no_progress)
        fn = model_embed_fn(model, device, amp, channels_last=amp is not None and device.type == "cpu")
        res = evaluate(fn, ds, args.protocol,
                       max_frames=args.max_frames or cfg["eval"]["max_frames"],
                       progress=not args.no_progress, min_frames=args.min_frames)
        res["checkpoint"], res["step"] = str(args.checkpoint), step
        res["amp"] = str(amp)
        _print_results(res)
        if "filtered" in res:
            f = res["filtered"]
            print(f"\nwithout the {len(f['excluded'])} sequence(s) shorter than "
                  f"{f['min_frames']} frames: {', '.join(f['excluded'])}")
            _print_results(f)
        print(f"{res['n_sequences']} sequences in {res['seconds']:.1f} s")
        out = Path(args.json) if args.json else Path(args.checkpoint).with_suffix(".eval.json")
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {out}")
        return 0
    return run


def _print_results(res):
    from qgait.evaluation import format_casia_b
    if "casia_b" in res:
        print(format_casia_b(res["casia_b"]))
    g = res["generic"]
    print("generic: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in g.items()))


def load_checkpoint_model(path):
    """``(model, cfg, step)`` from a training checkpoint (stage preparation applied, weights
    loaded, eval mode)."""
    import torch
    from qgait.models import build_model
    from qgait.train.trainer import STAGES
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    m = cfg["model"]
    sd = ck["model"]
    num_classes = sd["head.weight"].shape[-1] if "head.weight" in sd else 0
    model = build_model(m["name"], num_classes=num_classes, width=m["width"],
                        embed_dim=m["embed_dim"], bins=tuple(m["bins"]), scale=m["scale"])
    model = STAGES[cfg["stage"]].prepare(model, cfg)
    model.load_state_dict(sd)
    return model.eval(), cfg, int(ck["step"])


# ----------------------------------------------------------------------------- data
@command("data", "data tools: import-png (raw silhouette PNG tree -> OpenGait pickles)")
def _data(p: argparse.ArgumentParser):
    p.add_argument("action", choices=["import-png"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="the action's own arguments")

    def run(args, rest):
        try:
            from qgait.data import import_png
        except ImportError as e:
            raise SystemExit(f"qgait data import-png: qgait.data.import_png is unavailable ({e})")
        return import_png.main(list(args.args) + list(rest)) or 0
    return run


# ----------------------------------------------------------------------------- info
@command("info", "backends available here and the default model's summary")
def _info(p: argparse.ArgumentParser):
    p.add_argument("--config", default=None, help="summarise this config's model")

    def run(args, rest):
        import qgait
        from qgait.models import build_model
        from qgait.train import load_config
        print(f"qgait {qgait.__version__}")
        for name, b in qgait.backends().items():
            print(f"  {name:<10s} {'yes' if b['available'] else 'no ':<4s} {b['why']}")
        cfg = load_config(args.config, parse_rest(rest))
        m = cfg["model"]
        build_model(m["name"], num_classes=50, width=m["width"], embed_dim=m["embed_dim"],
                    bins=tuple(m["bins"]), scale=m["scale"]).summary()
        return 0
    return run


def parse_rest(rest):
    from qgait.train.config import parse_overrides
    return parse_overrides(rest) if rest else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgait", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, setup) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(_handler=setup(sp))
    return parser


def main(argv=None) -> int:
    """Entry point of the ``qgait`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # data import-png passes its own options through; other commands take --dotted overrides.
    args, rest = parser.parse_known_args(argv)
    return int(args._handler(args, rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

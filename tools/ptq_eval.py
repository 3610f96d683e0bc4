"""Post-training quantization of an fp teacher, evaluated as ``qgait study`` evaluates its variants.

    python tools/ptq_eval.py --teacher runs/fp_tune040/last.pt --train-ids 001 040 \
        --test-ids 041 050 --bits 8 --out runs/tune040_w8/ptq.json

The teacher's weights are quantized with the pipeline's stage config (``quantize_model``: the
binary-input stem and the kept-8-bit layers as in training) at ``--bits`` (W = A), and the steps
are set by one forward, in eval mode (BatchNorm statistics untouched), of ``--calib`` training
clips of 30 frames (LSQ weight steps, MSE activation steps): no training. ``--w-init mse``
sets each weight row's step by least squared rounding error instead of LSQ's rule, ``--a-init
max`` / ``pct`` each activation step by the calibration batch's largest magnitude / 99.995th
percentile of magnitudes instead of the least-squares clip (``--a-percentile Q``: another
percentile, for a sweep);
``--weights-only`` leaves every activation float (the two quantizers' costs apart). The
fake-quant model is then evaluated on the test subjects (the 11 x 11 CASIA-B protocol);
prints and writes the cross-view rank-1 per condition (JSON) and the per-probe outcomes beside
it (``.hits.npz``, the study's format, for ``tools/compare_hits.py``-style paired bootstraps).

``--fidelity-ids A B`` also embeds subjects A..B with the teacher and the quantized model and
reports the mean (and 99th percentile) relative difference of the embeddings, ``|e_q - e| /
|e|``: a criterion that needs no held-out identities, so quantization choices can be made on
training subjects and the test subjects kept for the report (docs/results.md). ``--save F``
writes the calibrated fake-quant model as a model file (``qgait convert`` packs it);
``--packed`` evaluates, compares and saves the model converted to packed integer layers instead.

    python tools/ptq_eval.py --teacher runs/casia_b11_fp_w1_full/last.pt --bits 8 \
        --w-init mse --a-init pct --fidelity-ids 041 050 --out runs/b11_w8/ptq_pct.json
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from qgait.nn.soft_quant import A_INITS, SOFT_QUANT_MODULES, W_INITS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="fp checkpoint or model file")
    ap.add_argument("--config", default="casia_b11_qgait_w1")
    ap.add_argument("--data", default=None, help="data root (overrides data.root)")
    ap.add_argument("--train-ids", nargs=2, default=None, help="first and last calibration "
                    "subject (default: the config's training subjects)")
    ap.add_argument("--test-ids", nargs=2, default=None, help="first and last test subject "
                    "(default: the config's)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--calib", type=int, default=32, help="calibration clips (default 32)")
    ap.add_argument("--w-init", choices=W_INITS, default="lsq",
                    help="weight steps: LSQ's 2 mean|w| / sqrt(qp) (the recipe's), or per channel "
                         "the step of least squared rounding error (quant.w_init)")
    ap.add_argument("--a-init", choices=A_INITS, default="mse",
                    help="activation steps: least squared error (clips the largest values), the "
                         "calibration batch's largest magnitude, or its 99.995th percentile "
                         "(quant.a_init)")
    ap.add_argument("--a-percentile", type=float, default=None, metavar="Q",
                    help="with --a-init pct: the percentile (default soft_quant.ACT_PERCENTILE)")
    ap.add_argument("--fidelity-ids", nargs=2, default=None, metavar=("FIRST", "LAST"),
                    help="also report the embeddings' relative difference from the teacher's on "
                         "these subjects (e.g. training subjects: no test identity needed)")
    ap.add_argument("--save", default=None, help="write the calibrated fake-quant model here "
                    "(with --packed: the packed model)")
    ap.add_argument("--packed", action="store_true", help="evaluate (and save) the calibrated "
                    "model converted to packed integer layers (qgait.quant.convert)")
    ap.add_argument("--weights-only", action="store_true", help="quantize the weights only "
                    "(activations stay float everywhere): separates the two quantizers' costs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON of the rank-1 table")
    args = ap.parse_args(argv)
    if args.a_percentile is not None and (args.a_init != "pct"
                                          or not 0.0 < args.a_percentile <= 100.0):
        ap.error("--a-percentile needs --a-init pct and a value in (0, 100]")

    from qgait.evaluation import extract, model_embed_fn
    from qgait.model_io import load_checkpoint_model, save_model
    from qgait.pipeline.stages import quantize_model
    from qgait.pipeline.study import _rank1, model_hits, save_hits
    from qgait.quant import set_quant_mode
    from qgait.train import load_config
    from qgait.train.build import load_dataset
    from qgait.train.data import make_ordered_batch

    data = {k: v for k, v in (("root", args.data), ("train_ids", args.train_ids),
                                  ("test_ids", args.test_ids)) if v is not None}
    cfg = load_config(args.config, {"data": data} if data else None)
    torch.manual_seed(args.seed)
    model, _ = load_checkpoint_model(args.teacher)
    model.eval()
    teacher = copy.deepcopy(model)
    quantize_model(model, {**cfg["quant"], "w_bits": args.bits, "a_bits": args.bits,
                           "w_init": args.w_init, "a_init": args.a_init})
    if args.weights_only:   # the same weight quantizers (kept-8-bit layers at 8), inputs float
        for m in model.modules():
            if isinstance(m, SOFT_QUANT_MODULES):
                m.a_bits = None
    set_quant_mode(model, k=0.0, mode="hard")
    train = load_dataset(cfg, "train", progress=False)
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(train), size=min(args.calib, len(train)), replace=False)
    x, _ = make_ordered_batch(train, [int(i) for i in idx], 30, rng)   # as training clips are cut
    if args.a_percentile is not None:                 # each layer's percentile_act_init
        for m in model.modules():
            if isinstance(m, SOFT_QUANT_MODULES):
                m.a_percentile = args.a_percentile
    with torch.no_grad():
        model(x)                                      # eval mode: sets the steps only
    if args.packed:
        from qgait.quant import convert
        model = convert(model)
    hits = model_hits(model, cfg, load_dataset(cfg, "test", progress=False), progress=False)
    r = _rank1(hits)
    if args.fidelity_ids:
        fcfg = load_config(args.config, {"data": {**data, "test_ids": list(args.fidelity_ids)}})
        fset, mf = load_dataset(fcfg, "test", progress=False), cfg["eval"]["max_frames"]
        ref, emb = (extract(model_embed_fn(m, "cpu", None), fset, max_frames=mf, progress=False)
                    for m in (teacher, model))
        rel = (emb - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)
        r["fidelity"] = {"subjects": list(args.fidelity_ids), "sequences": len(fset),
                         "rel_mean": float(rel.mean()), "rel_p99": float(rel.quantile(0.99))}
    print(json.dumps(r))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1) + "\n")
    setting = {"teacher": str(args.teacher), "bits": args.bits, "calib": args.calib,
               "calib_ids": cfg["data"]["train_ids"], "seed": args.seed,
               "weights_only": args.weights_only, "w_init": args.w_init, "a_init": args.a_init,
               "a_percentile": args.a_percentile, "packed": args.packed}
    save_hits(out.with_suffix(".hits.npz"), hits, setting)
    if args.save:
        save_model(model, args.save, {"ptq": setting}, config=cfg)
    return r


if __name__ == "__main__":
    main()

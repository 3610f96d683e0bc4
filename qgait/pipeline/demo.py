"""``qgait demo``: the whole QGait pipeline on built-in synthetic silhouettes, on a CPU.

1. generate a synthetic CASIA-B-like tree (or use ``--data``, an OpenGait pickle tree);
2. train a small full-precision GaitLite3D (stage 0);
3. for W8A8 and W4A4: stage 1 (QAT, straight-through) and stage 2 (soft quantizer + IDC);
4. convert each to a packed integer model and compare it with the fake-quant model over the
   whole test set;
5. evaluate every model with the CASIA-B protocol, measure model bytes and CPU latency per
   30-frame sequence; print one table, write ``results.json`` and ``results.png``.

Everything lands under ``--out`` and the run resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

from qgait.pipeline.run import run_pipeline, run_stage, stage_config, variant


def inference_nbytes(model: torch.nn.Module) -> int:
    """Bytes of everything an embedding needs: parameters and buffers, less the training-only
    classifier head (``head.*``)."""
    total = 0
    for k, t in model.state_dict().items():
        if k.startswith("head.") or not isinstance(t, torch.Tensor):
            continue
        total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, frames: int = 30, reps: int = 10) -> float:
    """Median CPU time of one embedding of a ``frames``-frame silhouette sequence."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 1, frames, 64, 44, generator=g) > 0.5).float()
    model.eval()
    for _ in range(2):
        model(x)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        model(x)
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


@torch.inference_mode()
def max_embedding_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    ea, eb = a(x)["embeddings"].float(), b(x)["embeddings"].float()
    return float((ea - eb).abs().max() / ea.abs().max().clamp_min(1e-12))


def _embed_all(model, ds, cfg, progress):
    """Embeddings ``[N, C, P]`` of the whole test set, fp32 on the CPU (no autocast)."""
    from qgait.evaluation import extract, model_embed_fn

    fn = model_embed_fn(model, "cpu", None)
    return extract(fn, ds, max_frames=cfg["eval"]["max_frames"], progress=progress)


def _labels(ds):
    import numpy as np
    return tuple(np.array([getattr(q, k) for q in ds.seqs])
                 for k in ("subject", "condition", "view"))


def _cross(res: dict) -> dict:
    cross = res["casia_b"]["cross_view"]
    return {c: cross[c]["mean"] for c in cross}


def compare_embeddings(fq: torch.Tensor, packed: torch.Tensor, ds) -> dict:
    """The packed model against its fake-quant model over a whole test set: per sequence the
    relative difference ``max |packed - fq| / max |fq|`` (its max and mean), both models'
    cross-view rank-1, whether it changed, and how many CASIA-B probe outcomes (probe x gallery
    view: nearest gallery sequence of the right subject or not) differ."""
    import numpy as np

    from qgait.evaluation import casia_b_hits
    from qgait.evaluation.evaluate import score

    n = fq.shape[0]
    d = (packed - fq).abs().reshape(n, -1).amax(dim=1)
    rel = d / fq.abs().reshape(n, -1).amax(dim=1).clamp_min(1e-12)
    labels = _labels(ds)
    r_fq, r_pk = _cross(score(fq, *labels)), _cross(score(packed, *labels))
    h_fq, h_pk = casia_b_hits(fq, *labels), casia_b_hits(packed, *labels)
    flips = 0
    for c, e in h_fq["cond"].items():
        a, b = e["hit"], h_pk["cond"][c]["hit"]
        flips += int(np.sum((a != b) & ~(np.isnan(a) & np.isnan(b))))
    return {"sequences": int(n), "max_rel_diff": float(rel.max()),
            "mean_rel_diff": float(rel.mean()), "rank1_fakequant": r_fq, "rank1_packed": r_pk,
            "rank1_changed": r_fq != r_pk, "probe_outcomes_changed": flips}


def scale_quant_stages(cfg: dict, fp_checkpoint) -> dict:
    """The demo sizes itself by the CPU it finds: its fp stage has a wall-time budget
    (``pipeline.fp.train.budget_minutes``) that a slow CPU cuts short, and the quantized stages
    are then shortened by the same fraction, so that the table compares the same recipe at a
    smaller scale. On a CPU where the budget is not binding nothing changes. The fraction comes
    from the fp checkpoint's length, so a resumed run picks the same lengths."""
    from qgait.model_io import read_header

    def length(st):   # the stage's iterations, as the pipeline will run it
        return int(stage_config(cfg, st, Path())["train"]["iterations"])

    full = length("fp")
    done = int(read_header(fp_checkpoint)["step"])
    if done >= full:
        return cfg
    frac = done / full
    n = {st: max(1, round(length(st) * frac)) for st in ("qat", "soft")}
    cfg = copy.deepcopy(cfg)
    for st in ("qat", "soft"):
        cfg["pipeline"].setdefault(st, {}).setdefault("train", {})["iterations"] = n[st]
    print(f"qgait demo: the fp stage's time budget fitted {done} of {full} iterations on this "
          f"CPU; the quantized stages train {frac:.0%} of their length too "
          f"({cfg['pipeline']['qat']['train']['iterations']} + "
          f"{cfg['pipeline']['soft']['train']['iterations']})", flush=True)
    return cfg


def demo_config(out: Path, data: str | None, fast: bool, overrides=None) -> dict:
    from qgait.train.config import load_config

    over: dict = {"train": {"out_dir": str(out)}}
    if data:
        over["data"] = {"root": data, "synthetic": None}
    else:
        over["data"] = {"root": str(out / "data")}
    cfg = load_config("demo_fast" if fast else "demo", over)
    if overrides:
        from qgait.train.config import _merge, validate
        cfg = validate(_merge(cfg, overrides))
    return cfg


def run_demo(out="runs/demo", data=None, fast=False, variants=("w8a8", "w4a4"),
             threads: int = 0, progress: bool = True, overrides=None) -> dict:
    """Runs the demo (module docstring); returns the results dict also written as JSON."""
    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    cfg = demo_config(out, data, fast, overrides)
    print(f"qgait demo: data {cfg['data']['root']}, output {out}, "
          f"{torch.get_num_threads()} threads", flush=True)
    fp = run_stage(stage_config(cfg, "fp", out / "fp"), progress)
    cfg = scale_quant_stages(cfg, fp)
    ckpts = run_pipeline(cfg, out, variants, progress=progress, fp_checkpoint=str(fp))
    t_train = time.perf_counter() - t_start
    res = report(ckpts, cfg, out, progress, name="results",
                 extra={"train_seconds": t_train, "data": cfg["data"]["root"]})
    print(f"({res['total_seconds']:.0f} s in all)")
    return res


def report(checkpoints: dict, cfg: dict, out, progress: bool = True, name: str = "report",
           extra: dict | None = None) -> dict:
    """The results table of a pipeline run: per checkpoint ("fp" and the variants) the
    cross-view rank-1 of the deployed model (the fp32 model, or the packed integer model of
    ``convert``), its bytes and CPU latency per 30-frame sequence. Every row is evaluated
    without autocast (``precision`` says how it ran); a quantized row also compares the packed
    model's embeddings with the fake-quant model's over the whole test set
    (:func:`compare_embeddings`, under ``fakequant_vs_packed``).

    Evaluations are cached in ``<checkpoint>.evals.json`` (:mod:`qgait.evaluation.cache`),
    keyed by the checkpoint's content hash, the evaluation's arguments, the test set's
    fingerprint and the qgait version: a changed model, data or qgait re-evaluates. Prints the
    table, writes ``<out>/<name>.json`` and ``<out>/<name>.png``."""
    from qgait.evaluation import cache
    from qgait.evaluation.evaluate import score
    from qgait.model_io import atomic_write_text, load_checkpoint_model
    from qgait.quant import convert
    from qgait.train.build import load_dataset

    t_start = time.perf_counter()
    test = load_dataset(cfg, "test", progress=False)
    data = cache.dataset_fingerprint(test)
    rows = []
    for vname, ck in checkpoints.items():
        ck = Path(ck)
        model, _ = load_checkpoint_model(ck)
        row = {"variant": vname}
        if vname == "fp":
            row.update(model="FP32", bits=32, precision="fp32")
            deployed = model
        else:
            v = variant(vname)
            row.update(model=f"{v.label} (packed int{v.w_bits})", bits=v.w_bits,
                       precision=f"packed W{v.w_bits}A{v.a_bits} integers, fp32 epilogue")
            deployed = convert(copy.deepcopy(model).eval())
        key = cache.evaluation_key(ck, deployed="fp32" if vname == "fp" else "packed",
                                   amp=None, protocol="casia-b", data=data,
                                   max_frames=cfg["eval"]["max_frames"])
        entry = cache.lookup(ck, key)
        if entry is None:
            t0 = time.perf_counter()
            feats = _embed_all(deployed, test, cfg, progress)
            full = score(feats, *_labels(test))
            full.update(protocol="casia-b", n_sequences=len(test),
                        seconds=time.perf_counter() - t0, precision=row["precision"])
            entry = {"evaluation": full}
            if vname != "fp":
                fq = _embed_all(model, test, cfg, progress)
                entry["fakequant_vs_packed"] = compare_embeddings(fq, feats, test)
            cache.store(ck, key, entry)
        row.update(_cross(entry["evaluation"]))
        if "fakequant_vs_packed" in entry:
            cmp = entry["fakequant_vs_packed"]
            row["fakequant_vs_packed"] = cmp
            row["fakequant_vs_packed_rel_diff"] = cmp["max_rel_diff"]
        row.update(bytes=inference_nbytes(deployed), latency_ms=latency_ms(deployed),
                   checkpoint=str(ck), evaluation_key=key)
        rows.append(row)
    res = {"rows": rows, "threads": torch.get_num_threads(), "test_sequences": len(test),
           **(extra or {})}
    res["total_seconds"] = res.get("train_seconds", 0.0) + time.perf_counter() - t_start
    print(format_table(res))
    out = Path(out)
    atomic_write_text(out / f"{name}.json", json.dumps(res, indent=2))
    plot_results(res, out / f"{name}.png")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return res


def format_table(res: dict) -> str:
    conds = [c for c in ("NM", "BG", "CL") if c in res["rows"][0]]
    head = f"{'model':<44s}" + "".join(f"{c:>7s}" for c in conds) + f"{'bytes':>11s}{'ms/seq':>9s}"
    lines = ["rank-1 (%, cross-view mean), inference bytes, CPU latency per 30-frame sequence; "
             "every row evaluated without autocast (FP32 in fp32, the others as packed "
             "integer models)", head]
    for r in res["rows"]:
        lines.append(f"{r['model']:<44s}" + "".join(f"{r[c]:7.1f}" for c in conds)
                     + f"{r['bytes']:11,d}{r['latency_ms']:9.1f}")
    for r in res["rows"]:
        c = r.get("fakequant_vs_packed")
        if c:
            lines.append(f"{r['variant']}: packed vs fake-quant over {c['sequences']} test "
                         f"sequences: relative difference max {c['max_rel_diff']:.1e}, mean "
                         f"{c['mean_rel_diff']:.1e}; rank-1 "
                         f"{'CHANGED' if c['rank1_changed'] else 'unchanged'} "
                         f"({c['probe_outcomes_changed']} probe outcomes differ)")
    return "\n".join(lines)


def plot_results(res: dict, path) -> None:
    """Accuracy vs bits and latency vs bits."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("qgait demo: matplotlib not installed, no plot (pip install matplotlib)")
        return
    # one point per bit width: fp32 and the QGait models (ablation rows stay in the table)
    rows = [r for r in res["rows"] if r.get("variant") in (None, "fp", "w8a8", "w4a4")]
    rows = sorted(rows, key=lambda r: -r["bits"])
    bits = [str(r["bits"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for c, m in (("NM", "o"), ("BG", "s"), ("CL", "^")):
        if c in rows[0]:
            a.plot(bits, [r[c] for r in rows], marker=m, label=c)
    a.set_xlabel("weight bits (32 = fp32)")
    a.set_ylabel("rank-1 (%), cross-view")
    a.set_title("accuracy vs bits")
    a.legend()
    b.bar(bits, [r["latency_ms"] for r in rows], color=["#888", "#4a7", "#27a"][: len(rows)])
    b.set_xlabel("weight bits (32 = fp32)")
    b.set_ylabel("ms per 30-frame sequence")
    b.set_title(f"CPU latency ({res['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

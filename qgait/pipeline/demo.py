"""``qgait demo``: the whole QGait pipeline on built-in synthetic silhouettes, on a CPU.

1. generate a synthetic CASIA-B-like tree (or use ``--data``, an OpenGait pickle tree);
2. train a small full-precision GaitLite3D (stage 0);
3. for W8A8 and W4A4: stage 1 (QAT, straight-through) and stage 2 (soft quantizer + IDC);
4. convert each to a packed integer model and check it against the fake-quant model;
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

from qgait.pipeline.run import run_pipeline, variant


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


def _evaluate(model, ds, cfg, progress):
    from qgait.evaluation import evaluate, model_embed_fn

    fn = model_embed_fn(model, "cpu", None)
    res = evaluate(fn, ds, "casia-b", max_frames=cfg["eval"]["max_frames"], progress=progress)
    cross = res["casia_b"]["cross_view"]
    return {c: cross[c]["mean"] for c in cross}, res


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
    ckpts = run_pipeline(cfg, out, variants, progress=progress)
    t_train = time.perf_counter() - t_start
    res = report(ckpts, cfg, out, progress, name="results",
                 extra={"train_seconds": t_train, "data": cfg["data"]["root"]})
    print(f"({res['total_seconds']:.0f} s in all)")
    return res


def report(checkpoints: dict, cfg: dict, out, progress: bool = True, name: str = "report",
           extra: dict | None = None) -> dict:
    """The results table of a pipeline run: per checkpoint ("fp" and the variants) the
    cross-view rank-1 of the deployed model (fp32, or packed integers via ``convert``), its
    bytes and its CPU latency per 30-frame sequence, and how far the packed model's embeddings
    are from the fake-quant model's. A checkpoint's evaluation is read from
    ``<checkpoint>.eval.json`` (what ``qgait eval`` writes) when present, else run and written
    there. Prints the table, writes ``<out>/<name>.json`` and ``<out>/<name>.png``."""
    from qgait.model_io import load_checkpoint_model
    from qgait.quant import convert
    from qgait.train.build import load_dataset

    t_start = time.perf_counter()
    test = load_dataset(cfg, "test", progress=False)
    x30 = torch.from_numpy(test.frames(0)[:30].astype("float32"))[None, None]
    rows = []
    for vname, ck in checkpoints.items():
        ck = Path(ck)
        model, _ = load_checkpoint_model(ck)
        row = {"variant": vname}
        if vname == "fp":
            row.update(model="FP32", bits=32)
            deployed = model
        else:
            v = variant(vname)
            row.update(model=f"{v.label} (packed int{v.w_bits})", bits=v.w_bits)
            deployed = convert(copy.deepcopy(model).eval())
            row["fakequant_vs_packed_rel_diff"] = max_embedding_diff(model, deployed, x30)
        ev_path = ck.with_suffix(".eval.json")
        if ev_path.exists():
            with open(ev_path) as f:
                cross = json.load(f)["casia_b"]["cross_view"]
            acc = {c: cross[c]["mean"] for c in cross}
        else:
            acc, full = _evaluate(deployed, test, cfg, progress)
            with open(ev_path, "w") as f:
                json.dump(full, f, indent=2)
        row.update(acc, bytes=inference_nbytes(deployed), latency_ms=latency_ms(deployed),
                   checkpoint=str(ck))
        rows.append(row)
    res = {"rows": rows, "threads": torch.get_num_threads(), "test_sequences": len(test),
           **(extra or {})}
    res["total_seconds"] = res.get("train_seconds", 0.0) + time.perf_counter() - t_start
    print(format_table(res))
    out = Path(out)
    with open(out / f"{name}.json", "w") as f:
        json.dump(res, f, indent=2)
    plot_results(res, out / f"{name}.png")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return res


def format_table(res: dict) -> str:
    conds = [c for c in ("NM", "BG", "CL") if c in res["rows"][0]]
    head = f"{'model':<44s}" + "".join(f"{c:>7s}" for c in conds) + f"{'bytes':>11s}{'ms/seq':>9s}"
    lines = ["rank-1 (%, cross-view mean), inference bytes, CPU latency per 30-frame sequence",
             head]
    for r in res["rows"]:
        lines.append(f"{r['model']:<44s}" + "".join(f"{r[c]:7.1f}" for c in conds)
                     + f"{r['bytes']:11,d}{r['latency_ms']:9.1f}")
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

"""The controlled study (``qgait study``): does QGait's method beat plain LSQ, and by how much?

From one full-precision teacher, every (bit width, method, seed) is trained with the same total
iterations (``qgait.pipeline.run``: a one-stage method gets both stages' budgets) and evaluated
with the CASIA-B protocol in fp32 on the configured test subjects. Methods:

* ``ste``    LSQ with the straight-through estimator for the whole budget (the baseline);
* ``soft1``  the soft quantizer in one stage, no IDC;
* ``noidc``  two stages (straight-through, then soft), no IDC;
* ``idc``    two stages + IDC (QGait).

The report gives, per bit width and method, the mean and standard deviation over seeds of the
cross-view rank-1 per condition and of their mean, and paired bootstraps over the test
subjects (:func:`qgait.evaluation.paired_bootstrap`) of the differences that answer the
question: two-stage + IDC minus LSQ, IDC's own share (two-stage + IDC minus two-stage) and
the soft quantizer alone (one soft stage minus LSQ). It writes ``study.json``, ``study.md``
and ``study.png`` (rank-1 with error bars) under the output folder.

Every run and every evaluation is cached: a finished stage is skipped (``final.pt``); an
evaluation is stored beside its checkpoint as ``<checkpoint>.hits.npz`` together with the
checkpoint's SHA-256, a fingerprint of the test set, the evaluation's settings and the qgait
version (:mod:`qgait.evaluation.cache`), and reused only when all of them match. Running the same command again therefore only does what is missing.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from qgait.pipeline.run import METHODS, run_stage, run_variant, stage_config

STUDY_METHODS = {"ste": "ste", "soft1": "soft1", "noidc": "noidc", "idc": ""}
LABELS = {"ste": "LSQ / straight-through only", "soft1": "soft quantizer, one stage",
          "noidc": "two-stage, no IDC", "idc": "two-stage + IDC (QGait)"}
# (a, b, what the difference a - b measures)
COMPARISONS = [("idc", "ste", "QGait (two-stage + IDC) - LSQ"),
               ("idc", "noidc", "IDC's share (two-stage + IDC - two-stage)"),
               ("soft1", "ste", "soft quantizer alone (one soft stage - LSQ)")]
CONDITIONS = ("NM", "BG", "CL")


def variant_name(bits: int, method: str) -> str:
    if method not in STUDY_METHODS:
        raise ValueError(f"qgait study: unknown method {method!r}; known: {list(STUDY_METHODS)}")
    suffix = STUDY_METHODS[method]
    assert suffix in METHODS
    return f"w{bits}a{bits}" + (f"-{suffix}" if suffix else "")


def _eval_key(ckpt: Path, cfg: dict, test) -> dict:
    from qgait.evaluation.cache import dataset_fingerprint, evaluation_key
    return evaluation_key(ckpt, kind="casia_b_hits", precision="fp32",
                          max_frames=int(cfg["eval"]["max_frames"]),
                          data=dataset_fingerprint(test))


def save_hits(path: Path, hits: dict, key: dict) -> None:
    arrays = {}
    for c, h in hits["cond"].items():
        arrays[f"{c}_subject"], arrays[f"{c}_view"], arrays[f"{c}_hit"] = (
            h["subject"], h["view"], h["hit"])
    meta = json.dumps({"key": key, "views": hits["views"], "conds": list(hits["cond"])})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(meta), **arrays)
    tmp.replace(path)


def hits_path(ckpt) -> Path:
    """Where the hits of a checkpoint are cached: ``<checkpoint>.hits.npz`` beside it."""
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.name + ".hits.npz")


def load_hits(path: Path, key: dict | None = None) -> dict | None:
    """The hits stored at ``path`` (with the ``key`` they were stored under); None when absent
    or stored under another ``key``."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if key is not None and meta["key"] != key:
            return None
        return {"views": meta["views"], "key": meta["key"],
                "cond": {c: {"subject": z[f"{c}_subject"], "view": z[f"{c}_view"],
                             "hit": z[f"{c}_hit"]} for c in meta["conds"]}}


def evaluate_hits(ckpt: Path, cfg: dict, test=None, progress: bool = True) -> dict:
    """Per-probe CASIA-B outcomes of a checkpoint (fp32, CPU), cached beside it."""
    from qgait.model_io import load_checkpoint_model
    from qgait.train.build import load_dataset

    ckpt = Path(ckpt)
    path = hits_path(ckpt)
    test = test if test is not None else load_dataset(cfg, "test", progress=False)
    key = _eval_key(ckpt, cfg, test)
    hits = load_hits(path, key)
    if hits is not None:
        return hits
    model, _ = load_checkpoint_model(ckpt)
    hits = model_hits(model, cfg, test, progress)
    save_hits(path, hits, key)
    return hits


def model_hits(model, cfg: dict, test, progress: bool = True) -> dict:
    """Per-probe CASIA-B outcomes of a model in memory on the ``test`` dataset (fp32, CPU)."""
    from qgait.evaluation import casia_b_hits, extract, model_embed_fn

    feats = extract(model_embed_fn(model, "cpu", None), test,
                    max_frames=cfg["eval"]["max_frames"], progress=progress)
    return casia_b_hits(feats, [q.subject for q in test.seqs],
                        [q.condition for q in test.seqs], [q.view for q in test.seqs])


def _rank1(hits: dict) -> dict:
    from qgait.evaluation import casia_b_tables
    cross = casia_b_tables(hits)["cross_view"]
    r = {c: cross[c]["mean"] for c in CONDITIONS if c in cross}
    r["mean"] = float(np.mean(list(r.values())))
    return r


def run_study(cfg: dict, out, fp_checkpoint=None, bits: Sequence[int] = (4, 3),
              methods: Sequence[str] = ("ste", "soft1", "noidc", "idc"),
              seeds: Sequence[int] = (0, 1, 2), n_boot: int = 10000,
              progress: bool = True) -> dict:
    """Trains and evaluates every (bits, method, seed) that is missing, then reports (module
    docstring). Without ``fp_checkpoint`` the teacher is trained first (stage 0, seed of the
    config) under ``<out>/fp``. Returns the report dict."""
    from qgait.train.build import load_dataset

    out = Path(out)
    names = {(b, m): variant_name(b, m) for b in bits for m in methods}
    fp = Path(fp_checkpoint) if fp_checkpoint else run_stage(
        stage_config(cfg, "fp", out / "fp"), progress)
    test = load_dataset(cfg, "test", progress=False)
    runs: dict = {"fp": evaluate_hits(fp, cfg, test, progress)}
    total = len(bits) * len(methods) * len(seeds)
    done = 0
    for b in bits:
        for s in seeds:
            scfg = copy.deepcopy(cfg)
            scfg["seed"] = int(s)
            for m in methods:
                done += 1
                print(f"qgait study: [{done}/{total}] {names[b, m]} seed {s}", flush=True)
                ck = run_variant(scfg, names[b, m], out / f"seed{s}", fp, progress)
                runs[(b, m, s)] = evaluate_hits(ck, cfg, test, progress)
    rep = study_report(runs, bits, methods, seeds, n_boot)
    rep.update({"fp_checkpoint": str(fp), "config": cfg.get("name"),
                "test_ids": list(cfg["data"]["test_ids"]),
                "iterations": {st: int(stage_config(cfg, st, out)["train"]["iterations"])
                               for st in ("qat", "soft")}})
    write_report(rep, out)
    return rep


def study_report(runs: dict, bits, methods, seeds, n_boot: int = 10000) -> dict:
    """Mean / std over seeds and the paired bootstraps, from ``runs[(bits, method, seed)]``
    (and ``runs["fp"]``) holding :func:`~qgait.evaluation.casia_b_hits` results."""
    from qgait.evaluation import paired_bootstrap

    rows = []
    if "fp" in runs:
        r = _rank1(runs["fp"])
        rows.append({"bits": 32, "method": "fp", "label": "full precision (teacher)", "n": 1,
                     **{c: {"mean": r[c], "std": 0.0, "seeds": [r[c]]} for c in r}})
    for b in bits:
        for m in methods:
            per = [_rank1(runs[(b, m, s)]) for s in seeds]
            row = {"bits": b, "method": m, "label": f"W{b}A{b} {LABELS[m]}", "n": len(per)}
            for c in list(CONDITIONS) + ["mean"]:
                v = [p[c] for p in per if c in p]
                if v:
                    row[c] = {"mean": float(np.mean(v)),
                              "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                              "seeds": v}
            rows.append(row)
    comps = []
    for b in bits:
        for a, z, what in COMPARISONS:
            if a in methods and z in methods:
                bs = paired_bootstrap([runs[(b, a, s)] for s in seeds],
                                      [runs[(b, z, s)] for s in seeds], n_boot=n_boot)
                comps.append({"bits": b, "a": a, "b": z, "what": what, **bs})
    return {"rows": rows, "comparisons": comps, "seeds": list(seeds), "n_boot": n_boot}


def format_report(rep: dict) -> str:
    """Markdown: the rank-1 table (mean +- std over seeds) and the bootstrap intervals."""
    lines = [f"Cross-view rank-1 (%), mean +- std over seeds {rep['seeds']}",
             "", "| model | NM | BG | CL | mean |", "| --- | --- | --- | --- | --- |"]
    for r in rep["rows"]:
        cells = [f"{r[c]['mean']:.1f} +- {r[c]['std']:.1f}" if c in r else "-"
                 for c in list(CONDITIONS) + ["mean"]]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if rep["comparisons"]:
        lines += ["", f"Paired bootstrap over test subjects ({rep['n_boot']} resamples), "
                  "difference in points with its 95% interval",
                  "", "| bits | difference | NM | BG | CL | mean over conditions |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in rep["comparisons"]:
            cells = [f"{c[k]['diff']:+.1f} [{c[k]['lo']:+.1f}, {c[k]['hi']:+.1f}]" if k in c
                     else "-" for k in list(CONDITIONS) + ["mean"]]
            lines.append(f"| W{c['bits']}A{c['bits']} | {c['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rep: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(rep)
    print(text)
    (out / "study.md").write_text(text + "\n")
    with open(out / "study.json", "w") as f:
        json.dump(rep, f, indent=2)
    plot_report(rep, out / "study.png")
    print(f"wrote {out / 'study.json'}, {out / 'study.md'} and {out / 'study.png'}")


def plot_report(rep: dict, path: Path) -> None:
    """One panel per condition (and their mean): rank-1 per method, grouped by bit width, with
    the seeds' standard deviation as error bars and the teacher as a dashed line."""
    from qgait.train.plot import _pyplot
    plt = _pyplot()
    panels = list(CONDITIONS) + ["mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    q = [r for r in rep["rows"] if r["method"] != "fp"]
    fp = next((r for r in rep["rows"] if r["method"] == "fp"), None)
    bits = sorted({r["bits"] for r in q}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in q))
    width = 0.8 / max(1, len(methods))
    for ax, c in zip(axes[0], panels):
        for i, m in enumerate(methods):
            rs = [next((r for r in q if r["bits"] == b and r["method"] == m), None) for b in bits]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j, r in enumerate(rs) if r]
            ys = [r[c]["mean"] for r in rs if r and c in r]
            es = [r[c]["std"] for r in rs if r and c in r]
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=LABELS[m])
        if fp is not None and c in fp:
            ax.axhline(fp[c]["mean"], ls="--", c="grey", lw=1, label="full precision")
        ax.set_xticks(range(len(bits)), [f"W{b}A{b}" for b in bits])
        ax.set_title(c if c != "mean" else "mean of NM / BG / CL")
        ax.set_ylabel("cross-view rank-1 (%)")
    # one legend below the panels: inside a panel it can hide a point
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Training curves: ``python -m qgait.train.plot RUN_DIR [--out curve.png]``.

Plots loss terms (a moving average over ``--smooth`` steps, raw values faint), the learning
rate, and, when ``RUN_DIR`` holds ``*.eval.json`` files from ``qgait eval`` of
``ckpt_<step>.pt`` checkpoints, the CASIA-B cross-view rank-1 per condition against the step.

``python -m qgait.train.plot RUN_A RUN_B ... [--labels A B ...] --out cmp.png`` compares runs:
their cross-view rank-1 against the step, one panel per condition.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np


def read_log(path) -> dict[str, np.ndarray]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows])
            for k in rows[0]} if rows else {}


def read_evals(run_dir) -> list[tuple[int, dict]]:
    out = []
    for p in sorted(Path(run_dir).glob("*.eval.json")):
        with open(p) as f:
            res = json.load(f)
        m = re.search(r"ckpt_(\d+)", p.name)
        step = res.get("step", int(m.group(1)) if m else None)
        if step is not None and "casia_b" in res:
            out.append((step, {c: v["mean"] for c, v in res["casia_b"]["cross_view"].items()}))
    return sorted(dict(out).items())  # one point per step


def smooth(v: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(v) < n:
        return v
    k = np.ones(n) / n
    return np.convolve(v, k, mode="valid")


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def rank1_series(evals, cond: str):
    """``(steps, rank-1s)`` of one condition from :func:`read_evals`; ``((), ())`` if absent."""
    pts = [(s, r[cond]) for s, r in evals if cond in r]
    return tuple(zip(*pts)) if pts else ((), ())


def plot_run(run_dir, out=None, smooth_n: int = 20) -> Path:
    """Writes the PNG (default ``RUN_DIR/curve.png``) and returns its path."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    log = read_log(run_dir / "log.csv")
    evals = read_evals(run_dir)
    n = 3 if evals else 2
    fig, ax = plt.subplots(1, n, figsize=(5 * n, 4))
    step = log["step"]
    for key, color in (("loss", "k"), ("triplet", "C0"), ("ce", "C1")):
        if key in log:
            ax[0].plot(step, log[key], color=color, alpha=0.2, lw=0.8)
            s = smooth(log[key], smooth_n)
            ax[0].plot(step[len(step) - len(s):], s, color=color, label=key)
    ax[0].set_xlabel("iteration")
    ax[0].set_ylabel(f"loss (moving average of {smooth_n})")
    ax[0].legend()
    ax[0].grid(alpha=0.3)
    ax[1].plot(step, log["lr"], color="C2", label="lr")
    if "ce_accuracy" in log:
        ax1b = ax[1].twinx()
        s = smooth(log["ce_accuracy"], smooth_n)
        ax1b.plot(step[len(step) - len(s):], s, color="C3", label="train accuracy (BNNeck)")
        ax1b.set_ylabel("train accuracy")
        ax1b.legend(loc="center right")
    ax[1].set_xlabel("iteration")
    ax[1].set_ylabel("learning rate")
    ax[1].legend(loc="upper right")
    ax[1].grid(alpha=0.3)
    if evals:
        for cond in ("NM", "BG", "CL"):
            xs, ys = rank1_series(evals, cond)
            if xs:
                ax[2].plot(xs, ys, "o-", label=cond)
                for x, y in zip(xs, ys):
                    ax[2].annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 5),
                                   ha="center", fontsize=8)
        ax[2].set_xlabel("iteration")
        ax[2].set_ylabel("CASIA-B cross-view rank-1 (%)")
        ax[2].set_ylim(0, 100)
        ax[2].legend()
        ax[2].grid(alpha=0.3)
    fig.suptitle(f"{run_dir.name}")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def compare_runs(run_dirs, out, labels=None) -> Path:
    """CASIA-B cross-view rank-1 against the step of several runs (their ``*.eval.json``), one
    panel per condition; writes the PNG ``out`` and returns its path."""
    run_dirs = [Path(d) for d in run_dirs]
    labels = list(labels) if labels else [d.name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"compare_runs: {len(labels)} labels for {len(run_dirs)} runs")
    evals = [read_evals(d) for d in run_dirs]
    for d, e in zip(run_dirs, evals):
        if not e:
            raise ValueError(f"compare_runs: {d} holds no CASIA-B *.eval.json")
    plt = _pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for k, cond in enumerate(("NM", "BG", "CL")):
        for i, (label, e) in enumerate(zip(labels, evals)):
            xs, ys = rank1_series(e, cond)
            if xs:
                ax[k].plot(xs, ys, "o-", color=f"C{i}", label=label)
                ax[k].annotate(f"{ys[-1]:.1f}", (xs[-1], ys[-1]), textcoords="offset points",
                               xytext=(4, -3), fontsize=8, color=f"C{i}")
        ax[k].set_title(cond)
        ax[k].set_xlabel("iteration")
        ax[k].grid(alpha=0.3)
    ax[0].set_ylabel("CASIA-B cross-view rank-1 (%)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="+", help="one run (its curves) or several (compared)")
    ap.add_argument("--out")
    ap.add_argument("--labels", nargs="+", help="legend names of the compared runs")
    ap.add_argument("--smooth", type=int, default=20)
    a = ap.parse_args(argv)
    if len(a.run_dir) == 1:
        print(plot_run(a.run_dir[0], a.out, a.smooth))
    else:
        print(compare_runs(a.run_dir, a.out or "compare.png", a.labels))


if __name__ == "__main__":
    main()

"""Paired bootstrap over test subjects for differences of CASIA-B cross-view rank-1.

Two methods evaluated on the same test subjects (each possibly over several training seeds) are
compared by resampling the *probe subjects* with replacement, recomputing both methods'
cross-view rank-1 on the same resample (paired), and reading the interval of the difference off
the resampled differences (percentile interval). The gallery stays as it is: a resample changes
who is asked, not whom they are compared with (duplicating a gallery subject would change
nothing, and dropping one would make the task easier for both methods alike).

A method's rank-1 on a resample is the mean over its seeds of the per-seed number: seeds are
averaged, subjects are resampled. The seeds' own spread is reported separately (std).

Everything is vectorised: per condition, ``S[s, pv, gv]`` (hits of subject s's probes at probe
view pv against gallery view gv) and ``N[s, pv]`` (its probes there) turn a batch of resample
weights ``W [B, subjects]`` into every cell of every resample with two matrix products.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np


def subject_sums(hits: dict) -> dict:
    """``{cond: (subjects, S [ns, V, V], N [ns, V])}`` from :func:`~qgait.evaluation.metrics.casia_b_hits`
    (NaN gallery cells stay NaN in S)."""
    views = hits["views"]
    out = {}
    for name, h in hits["cond"].items():
        subs = sorted(set(h["subject"].tolist()))
        si = {s: i for i, s in enumerate(subs)}
        vi = {v: i for i, v in enumerate(views)}
        S = np.zeros((len(subs), len(views), len(views)))
        N = np.zeros((len(subs), len(views)))
        rows = np.array([si[s] for s in h["subject"]])
        cols = np.array([vi[v] for v in h["view"]])
        np.add.at(S, (rows, cols), h["hit"])
        np.add.at(N, (rows, cols), 1.0)
        out[name] = (subs, S, N)
    return out


def cross_view_mean(sums: dict, subjects: Sequence[str], W: np.ndarray) -> dict:
    """Cross-view rank-1 (%) per condition for each row of resample weights ``W [B, ns]``
    (weights indexed like ``subjects``); ``{cond: [B]}``."""
    W = np.atleast_2d(np.asarray(W, dtype=float))
    idx = {s: i for i, s in enumerate(subjects)}
    out = {}
    for name, (subs, S, N) in sums.items():
        w = W[:, [idx[s] for s in subs]]                       # [B, ns]
        V = S.shape[1]
        num = (w @ S.reshape(len(subs), -1)).reshape(-1, V, V)  # [B, pv, gv]
        den = w @ N                                            # [B, pv]
        off = ~np.eye(V, dtype=bool)
        # a probe view absent from a resample gives 0/0 and an all-NaN row: left out of the mean
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cell = np.where(off[None], num / den[:, :, None], np.nan)  # identical views out
            per_view = np.nanmean(cell, axis=2)                # over gallery views
            out[name] = np.nanmean(per_view, axis=1) * 100     # over probe views
    return out


def _method(hits_per_seed: Sequence[dict]):
    if not hits_per_seed:
        raise ValueError("paired_bootstrap: a method needs at least one evaluated seed")
    return [subject_sums(h) for h in hits_per_seed]


def _rank1(method_sums, subjects, W) -> dict:
    per_seed = [cross_view_mean(s, subjects, W) for s in method_sums]
    conds = per_seed[0].keys()
    return {c: np.mean([p[c] for p in per_seed], axis=0) for c in conds}


def paired_bootstrap(a: Sequence[dict], b: Sequence[dict], n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95, chunk: int = 2000) -> dict:
    """Interval of rank-1(a) - rank-1(b), per condition and for their mean.

    Args:
        a, b: per-seed :func:`~qgait.evaluation.metrics.casia_b_hits` of the two methods, on the
            same test subjects.
        n_boot: resamples; seed: their random stream; level: the interval's coverage.

    Returns:
        ``{cond or "mean": {"a": %, "b": %, "diff": %, "lo": %, "hi": %, "p_le_0": fraction of
        resamples with diff <= 0}}`` (point estimates on the full test set; "mean" is the mean
        over the conditions).
    """
    sa, sb = _method(a), _method(b)
    subjects = sorted({s for sums in sa + sb for (subs, _, _) in sums.values() for s in subs})
    ns = len(subjects)
    full = np.ones((1, ns))
    pa, pb = _rank1(sa, subjects, full), _rank1(sb, subjects, full)
    conds = [c for c in pa if c in pb]
    rng = np.random.default_rng(seed)
    diffs = {c: [] for c in conds + ["mean"]}
    for start in range(0, n_boot, chunk):
        W = rng.multinomial(ns, np.full(ns, 1.0 / ns), size=min(chunk, n_boot - start))
        ra, rb = _rank1(sa, subjects, W), _rank1(sb, subjects, W)
        for c in conds:
            diffs[c].append(ra[c] - rb[c])
        diffs["mean"].append(np.mean([ra[c] - rb[c] for c in conds], axis=0))
    alpha = (1 - level) / 2
    out = {}
    for c in conds + ["mean"]:
        d = np.concatenate(diffs[c])
        if c == "mean":
            va, vb = np.mean([pa[k][0] for k in conds]), np.mean([pb[k][0] for k in conds])
        else:
            va, vb = pa[c][0], pb[c][0]
        out[c] = {"a": float(va), "b": float(vb), "diff": float(va - vb),
                  "lo": float(np.nanquantile(d, alpha)), "hi": float(np.nanquantile(d, 1 - alpha)),
                  "p_le_0": float(np.mean(d <= 0))}
    return out

"""Retrieval metrics for gait recognition.

Distances follow OpenGait: Euclidean per horizontal part, averaged over parts. Two protocols:

* CASIA-B (:func:`casia_b_rank1`): gallery nm-01..04, probes nm-05..06 / bg-01..02 / cl-01..02;
  rank-1 for every (probe view, gallery view) pair, reported as the mean over pairs of
  *different* views (the standard cross-view table) and, separately, the same-view accuracy.
  A probe is correct when its nearest gallery sequence (of that gallery view) has its
  subject; a probe whose subject is absent from that gallery view counts as a miss.
* generic (:func:`retrieval_metrics`, Gait3D style): rank-k (CMC), mAP and mINP over probes
  with at least one true match in the gallery (probes without one are counted and skipped,
  the usual re-identification convention, since their AP is undefined).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

CASIA_B_GALLERY = ("nm-01", "nm-02", "nm-03", "nm-04")
CASIA_B_PROBES = {"NM": ("nm-05", "nm-06"), "BG": ("bg-01", "bg-02"), "CL": ("cl-01", "cl-02")}


def part_distance(probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Mean over parts of the per-part Euclidean distance.

    Args:
        probe: ``[Np, C, P]``; gallery: ``[Ng, C, P]``.

    Returns:
        ``[Np, Ng]`` float32 (float64 inputs stay float64).
    """
    probe, gallery = torch.as_tensor(probe), torch.as_tensor(gallery)
    dt = torch.float64 if probe.dtype == torch.float64 else torch.float32
    p = probe.to(dt).permute(2, 0, 1).contiguous()          # [P, Np, C]
    g = gallery.to(dt).permute(2, 0, 1).contiguous()        # [P, Ng, C]
    # cdist's matmul path loses precision on near-identical vectors: use the direct one.
    return torch.cdist(p, g, compute_mode="donot_use_mm_for_euclid_dist").mean(0)


def retrieval_metrics(dist, probe_labels, gallery_labels, ks: Sequence[int] = (1, 5, 10),
                      exclude=None) -> dict:
    """CMC rank-k, mAP and mINP from a distance matrix (smaller is closer).

    Args:
        dist: ``[Np, Ng]``.
        probe_labels: ``[Np]``; gallery_labels: ``[Ng]`` (any comparable ids).
        ks: the ranks to report.
        exclude: optional bool ``[Np, Ng]``: pairs to leave out (e.g. a sequence and itself).

    Returns:
        ``{"rank-1": %, ..., "mAP": %, "mINP": %, "n_probes": int, "n_no_match": int}``
        (percentages over probes with a match; NaN when none has one). Ties in distance are
        broken by gallery order (stable sort).
    """
    dist = np.asarray(torch.as_tensor(dist).cpu(), dtype=np.float64)
    pl, gl = np.asarray(probe_labels), np.asarray(gallery_labels)
    same = gl[None, :] == pl[:, None]
    if exclude is not None:
        ex = np.asarray(torch.as_tensor(exclude).cpu(), dtype=bool)
        dist = np.where(ex, np.inf, dist)     # excluded pairs rank last ...
        same = same & ~ex                     # ... and never count as matches
    order = np.argsort(dist, axis=1, kind="stable")
    matches = np.take_along_axis(same, order, axis=1)        # [Np, Ng] in ranked order
    has = matches.any(1)
    out = {"n_probes": int(len(pl)), "n_no_match": int((~has).sum())}
    m = matches[has]
    if len(m) == 0:
        out.update({f"rank-{k}": float("nan") for k in ks})
        out.update({"mAP": float("nan"), "mINP": float("nan")})
        return out
    first = m.argmax(1)                                      # rank (0-based) of the first match
    for k in ks:
        out[f"rank-{k}"] = float((first < k).mean() * 100)
    cum = m.cumsum(1)
    ranks = np.arange(1, m.shape[1] + 1)
    ap = (cum / ranks * m).sum(1) / m.sum(1)                 # mean precision at each match
    last = m.shape[1] - 1 - m[:, ::-1].argmax(1)             # rank of the hardest match
    inp = m.sum(1) / (last + 1)
    out["mAP"] = float(ap.mean() * 100)
    out["mINP"] = float(inp.mean() * 100)
    return out


def casia_b_hits(feats, subjects, conditions, views) -> dict:
    """Per-probe outcomes of the CASIA-B protocol, the unit the tables and the bootstrap share.

    Args:
        feats: ``[N, C, P]`` embeddings of every test sequence.
        subjects, conditions, views: per-sequence strings (``"051"``, ``"nm-05"``, ``"090"``).

    Returns:
        ``{"views": [...], "cond": {name: {"subject": [Np], "view": [Np],
        "hit": float [Np, V]}}}`` for name in NM / BG / CL with probes and a gallery:
        ``hit[i, j]`` is 1.0 when probe i's nearest gallery sequence of view ``views[j]`` has
        its subject (0.0 when not, also when the subject is absent from that gallery view) and
        NaN when that gallery view has no sequence.
    """
    feats = torch.as_tensor(feats)
    subjects, conditions, views = (np.asarray(a) for a in (subjects, conditions, views))
    all_views = sorted(set(views.tolist()))
    gal_cond = np.isin(conditions, CASIA_B_GALLERY)
    out: dict = {"views": all_views, "cond": {}}
    if not gal_cond.any():
        return out
    for name, conds in CASIA_B_PROBES.items():
        pm = np.isin(conditions, conds)
        if not pm.any():
            continue
        hit = np.full((int(pm.sum()), len(all_views)), np.nan)
        for j, gv in enumerate(all_views):
            gm = gal_cond & (views == gv)
            if gm.any():
                d = part_distance(feats[pm], feats[gm])
                hit[:, j] = subjects[gm][d.argmin(1).numpy()] == subjects[pm]
        out["cond"][name] = {"subject": subjects[pm], "view": views[pm], "hit": hit}
    return out


def casia_b_tables(hits: dict, weights=None) -> dict:
    """The rank-1 tables of :func:`casia_b_rank1` from :func:`casia_b_hits`.

    ``weights`` (optional) maps a subject to how many times it counts as a probe (a bootstrap
    resample; subjects not in it count 0); the gallery is left as it is.
    """
    views = hits["views"]
    res = {"views": views, "table": {}, "cross_view": {}, "same_view": {}}
    for name, h in hits["cond"].items():
        w = (np.ones(len(h["subject"])) if weights is None else
             np.array([weights.get(s, 0) for s in h["subject"]], dtype=float))
        table: dict = {}
        for pv in views:
            pm = (h["view"] == pv) & (w > 0)
            if not pm.any():
                continue
            table[pv] = {gv: float(np.average(h["hit"][pm, j], weights=w[pm]) * 100)
                         for j, gv in enumerate(views) if not np.isnan(h["hit"][pm, j]).any()}
        cross = {}
        for pv, row in table.items():
            others = [a for gv, a in row.items() if gv != pv]
            if others:
                cross[pv] = float(np.mean(others))
        if cross:
            cross["mean"] = float(np.mean(list(cross.values())))
        same = {pv: row[pv] for pv, row in table.items() if pv in row}
        if same:
            same["mean"] = float(np.mean(list(same.values())))
        res["table"][name], res["cross_view"][name], res["same_view"][name] = table, cross, same
    return res


def casia_b_rank1(feats, subjects, conditions, views) -> dict:
    """The CASIA-B rank-1 tables (OpenGait's protocol).

    Args:
        feats: ``[N, C, P]`` embeddings of every test sequence.
        subjects, conditions, views: per-sequence strings (``"051"``, ``"nm-05"``, ``"090"``).

    Returns:
        ``{"views": [...], "table": {cond: {probe_view: {gallery_view: %}}},
        "cross_view": {cond: {probe_view: % mean over other gallery views, "mean": %}},
        "same_view": {cond: {view: %, "mean": %}}, "mAP": {cond: %}}`` for cond in NM / BG /
        CL (conditions with no probe or gallery sequence are left out). The cross-view mean is
        the standard number: rank-1 per (probe view, gallery view) cell, averaged over the
        gallery views other than the probe's, then over the probe views. ``mAP`` ranks each
        probe against the whole nm-01..04 gallery less the sequences of the probe's own view.
    """
    res = casia_b_tables(casia_b_hits(feats, subjects, conditions, views))
    feats = torch.as_tensor(feats)
    subjects, conditions, views = (np.asarray(a) for a in (subjects, conditions, views))
    gal = np.isin(conditions, CASIA_B_GALLERY)
    res["mAP"] = {}
    for name in res["table"]:
        pm = np.isin(conditions, CASIA_B_PROBES[name])
        d = part_distance(feats[pm], feats[gal])
        same_view = views[pm][:, None] == views[gal][None, :]
        res["mAP"][name] = retrieval_metrics(d, subjects[pm], subjects[gal],
                                             exclude=same_view)["mAP"]
    return res


def format_casia_b(res: dict, full: bool = True) -> str:
    """The standard table (rows NM / BG / CL, one column per probe view, the mean excluding
    identical views), the same-view table, per-condition mAP and, when ``full``, each
    condition's probe-view x gallery-view rank-1 table."""
    views = res["views"]
    head = f"{'probe':<6s}" + "".join(f"{v:>7s}" for v in views) + f"{'mean':>7s}"

    def cells(row):
        return "".join(f"{row[v]:7.1f}" if v in row else f"{'-':>7s}" for v in views)
    lines = ["CASIA-B rank-1 (%), cross-view (gallery views != probe view, averaged)", head]
    for name, cross in res["cross_view"].items():
        lines.append(f"{name:<6s}{cells(cross)}{cross.get('mean', float('nan')):7.2f}")
    lines += ["CASIA-B rank-1 (%), same view", head]
    for name, same in res["same_view"].items():
        lines.append(f"{name:<6s}{cells(same)}{same.get('mean', float('nan')):7.2f}")
    if res.get("mAP"):
        lines.append("mAP (%, gallery without the probe's view): " + ", ".join(
            f"{k} {v:.2f}" for k, v in res["mAP"].items()))
    if full:
        for name, table in res["table"].items():
            lines += [f"{name}: rank-1 (%) per probe view (rows) x gallery view (columns); "
                      "mean excludes the identical view",
                      f"{'':<6s}" + "".join(f"{v:>7s}" for v in views) + f"{'mean':>7s}"]
            for pv in views:
                if pv in table:
                    m = res["cross_view"][name].get(pv, float("nan"))
                    lines.append(f"{pv:<6s}{cells(table[pv])}{m:7.2f}")
    return "\n".join(lines)

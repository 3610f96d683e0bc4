"""A training-free baseline: gait energy images (GEI) + nearest neighbour, CASIA-B protocol.

A GEI is the mean binary silhouette of a sequence (``[64, 44]`` in [0, 1]). With gallery
``nm-01..04`` and probes ``nm-05/06``, ``bg-01/02``, ``cl-01/02`` (CASIA-B's protocol), a probe
is matched to the gallery sequence of smallest Euclidean GEI distance in one gallery view.
It tells how hard a data set is before any training: on real CASIA-B it is good within one
view and poor across views and clothes, and a synthetic set should behave alike.
"""
from __future__ import annotations

import numpy as np

__all__ = ["gei_rank1", "geis"]

GALLERY = ("nm-01", "nm-02", "nm-03", "nm-04")
PROBES = {"NM": ("nm-05", "nm-06"), "BG": ("bg-01", "bg-02"), "CL": ("cl-01", "cl-02")}


def geis(dataset) -> np.ndarray:
    """float32 ``[len(dataset), 64, 44]``: the mean silhouette of each sequence."""
    return np.stack([dataset.frames(i).mean(axis=0, dtype=np.float32)
                     for i in range(len(dataset))])


def gei_rank1(dataset, gallery=GALLERY, probes=PROBES) -> dict:
    """Rank-1 accuracy (%) of GEI nearest neighbour.

    Returns:
        ``{probe_set: {"same_view": %, "cross_view": %}}``, "same_view" over probe / gallery
        pairs of equal view, "cross_view" over all pairs of different views (each pair of
        views weighted equally, as CASIA-B tables average their view columns).
    """
    g = geis(dataset).reshape(len(dataset), -1)
    conds = np.array([q.condition for q in dataset.seqs])
    views = np.array([q.view for q in dataset.seqs])
    labels = np.asarray(dataset.labels)
    sq = (g * g).sum(axis=1)
    out = {}
    for name, pconds in probes.items():
        same, cross = [], []
        for pv in np.unique(views):
            pm = np.isin(conds, pconds) & (views == pv)
            if not pm.any():
                continue
            for gv in np.unique(views):
                gm = np.isin(conds, gallery) & (views == gv)
                if not gm.any():
                    continue
                d = sq[pm][:, None] + sq[gm][None] - 2 * g[pm] @ g[gm].T
                hit = labels[gm][d.argmin(axis=1)] == labels[pm]
                (same if pv == gv else cross).append(hit.mean() * 100)
        out[name] = {"same_view": float(np.mean(same)) if same else float("nan"),
                     "cross_view": float(np.mean(cross)) if cross else float("nan")}
    return out

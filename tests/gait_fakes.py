"""A tiny in-memory stand-in for OpenGaitDataset: procedural silhouettes whose shape depends on
the subject (body width, head size, stride), so a model can learn to tell them apart."""
from __future__ import annotations

import numpy as np

from qgait.data import SeqInfo

CONDS = ["nm-01", "nm-02", "nm-03", "nm-04", "nm-05", "nm-06", "bg-01", "bg-02", "cl-01", "cl-02"]
VIEWS = ["000", "090", "180"]


def _frame(sub: int, view: int, t: int, cond: str, rng) -> np.ndarray:
    H, W = 64, 44
    yy, xx = np.mgrid[0:H, 0:W]
    r = np.random.default_rng(sub)
    body_w = 4 + r.integers(0, 6)
    head = 3 + r.integers(0, 4)
    stride = 0.3 + 0.4 * r.random()
    cx = 22 + (view - 1) * 2
    img = ((xx - cx) ** 2 / body_w ** 2 + (yy - 25) ** 2 / 14 ** 2) <= 1
    img |= ((xx - cx) ** 2 + (yy - 8) ** 2) <= head ** 2
    swing = int(round(6 * np.sin(stride * t)))
    for sgn in (-1, 1):
        lx = cx + sgn * swing
        img |= (np.abs(xx - lx) <= 2) & (yy >= 38) & (yy < 63)
    if cond.startswith("bg"):
        img |= ((xx - cx - body_w) ** 2 + (yy - 28) ** 2) <= 16
    if cond.startswith("cl"):
        img |= (np.abs(xx - cx) <= body_w + 2) & (yy >= 14) & (yy < 42)
    noise = rng.random((H, W)) < 0.01
    return (img ^ noise).astype(np.uint8)


class FakeGaitDataset:
    """``n_subjects`` x conditions x views sequences of ``frames`` (+ per-seq jitter) frames."""

    def __init__(self, n_subjects=6, conds=CONDS, views=VIEWS, frames=12, seed=0, first_id=1):
        rng = np.random.default_rng(seed)
        self.seqs, self._data = [], []
        for s in range(n_subjects):
            name = f"{first_id + s:03d}"
            for c in conds:
                for vi, v in enumerate(views):
                    T = frames + int(rng.integers(0, 4))
                    arr = np.stack([_frame(first_id + s, vi, t, c, rng) for t in range(T)])
                    self.seqs.append(SeqInfo(name, c, v, f"{name}/{c}/{v}"))
                    self._data.append(arr)
        self.subjects = sorted({q.subject for q in self.seqs})
        idx = {s: i for i, s in enumerate(self.subjects)}
        self.labels = np.array([idx[q.subject] for q in self.seqs], dtype=np.int64)

    def __len__(self):
        return len(self.seqs)

    def n_frames(self, i):
        return self._data[i].shape[0]

    def frames(self, i):
        return self._data[i]

    def frames_at(self, i, t):
        return self._data[i][np.asarray(t, dtype=np.int64)]

    def __getitem__(self, i):
        return self._data[i], int(self.labels[i]), self.seqs[i]

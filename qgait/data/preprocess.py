"""The standard gait-silhouette normalisation (GaitSet / OpenGait's pretreatment), in numpy.

One raw silhouette frame (any size, person bright on dark) becomes a 64 x 64 uint8 frame:

1. crop to the person: the rows (and columns) holding any foreground pixel;
2. resize to height 64 keeping the aspect ratio (a separable triangle filter whose support
   widens when shrinking, i.e. antialiased bilinear; grey edges remain, as in OpenGait's
   cubic-resized pickles);
3. centre horizontally on the column where the cumulative foreground mass reaches half
   (the horizontal centroid in the robust, median sense: a bag does not drag it far);
4. pad / cut to 64 columns around that column.

Frames with fewer than ``min_pixels`` foreground pixels are dropped (None).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["normalise_frame", "normalise_frames", "resize", "resize_weights"]

OUT = 64


@lru_cache(maxsize=4096)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """Row-stochastic ``[n_out, n_in]`` float32 matrix of an antialiased linear resize.

    Output sample j sits at input coordinate ``c = (j + 0.5) * n_in / n_out - 0.5`` (pixel
    centres aligned); its weights are a triangle of half-width ``max(1, n_in / n_out)`` input
    pixels around c, normalised to sum 1.
    """
    scale = n_in / n_out
    support = max(1.0, scale)
    c = (np.arange(n_out) + 0.5) * scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - c[:, None]) / support)
    # c lies within half a pixel of some input pixel and support >= 1: no row sums to 0.
    w /= w.sum(axis=1, keepdims=True)
    w.setflags(write=False)
    return w.astype(np.float32)


def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Antialiased linear resize of a 2-D array to ``[h, w]`` (float32)."""
    img = np.asarray(img, dtype=np.float32)
    return resize_weights(img.shape[0], h) @ img @ resize_weights(img.shape[1], w).T


def normalise_frame(img: np.ndarray, min_pixels: int = 1) -> np.ndarray | None:
    """One silhouette (2-D, uint8 0..255 or bool) -> uint8 ``[64, 64]``, or None if empty.

    See the module docstring for the steps. Foreground is ``img > 0`` for locating the person;
    the grey values themselves are resized.
    """
    if img.ndim != 2:
        raise ValueError(f"normalise_frame: expected a 2-D image, got shape {img.shape}")
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    fg = img > 0
    if int(fg.sum()) < max(1, min_pixels):
        return None
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg.any(axis=0))
    crop = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    new_w = max(1, round(w * OUT / h))
    r = resize(crop, OUT, new_w)
    col = r.sum(axis=0)
    mass = np.cumsum(col)
    half = mass[-1] / 2.0
    x = int(np.searchsorted(mass, half))  # first column whose right edge reaches half
    before = mass[x - 1] if x > 0 else 0.0
    centre = x + (half - before) / col[x]  # continuous position of the half-mass line
    shift = int(np.floor(OUT / 2 - centre + 0.5))  # resized column c -> output c + shift
    out = np.zeros((OUT, OUT), np.float32)
    lo, hi = max(0, -shift), min(new_w, OUT - shift)
    if hi > lo:
        out[:, lo + shift:hi + shift] = r[:, lo:hi]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def normalise_frames(frames, min_pixels: int = 1) -> np.ndarray:
    """Normalises each frame of an iterable, dropping empty ones: uint8 ``[T', 64, 64]``."""
    out = [f for f in (normalise_frame(np.asarray(x), min_pixels) for x in frames)
           if f is not None]
    return np.stack(out) if out else np.zeros((0, OUT, OUT), np.uint8)

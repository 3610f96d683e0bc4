"""Sequence-level augmentation of binary silhouette clips for training.

Every transform is drawn once per sequence and applied to all of its frames alike: a 3-D conv
reads motion between neighbouring frames, and a silhouette that jumps, turns or loses a
different patch from frame to frame is motion that never happens. What a transform may change
is what differs between cameras, walks and segmentations of the same person: the walking
direction (horizontal flip), the framing (a small rotation, scale and shift of the whole clip)
and a static occluder (a rectangle erased from every frame).

All transforms map {0, 1} to {0, 1} (nearest-neighbour resampling, zeros from outside the
frame), and all randomness comes from the generator passed in, so a training batch stays a pure
function of its step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["SilhouetteAugment", "warp"]


@dataclass(frozen=True)
class SilhouetteAugment:
    """Random per-sequence flip, affine warp and erasing of ``[T, H, W]`` silhouette clips.

    Args:
        flip: probability of mirroring the clip left-right.
        affine: probability of warping the clip by one random similarity transform:
            rotation in ``[-rotate, rotate]`` degrees about the frame centre, scale in
            ``[1 - scale, 1 + scale]``, shift in ``[-shift, shift]`` of the frame's height
            (vertically) and width (horizontally).
        erase: probability of zeroing one rectangle in every frame; its area is a uniform
            fraction ``erase_area`` of the frame, its aspect ratio log-uniform in [1/3, 3],
            its centre a random pixel of the walker (of the union of the clip's frames), so
            that it hides part of the body rather than background.
    """

    flip: float = 0.0
    affine: float = 0.0
    rotate: float = 10.0
    scale: float = 0.1
    shift: float = 0.05
    erase: float = 0.0
    erase_area: tuple[float, float] = (0.02, 0.1)

    def __post_init__(self):
        for k in ("flip", "affine", "erase"):
            p = getattr(self, k)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"SilhouetteAugment: {k} is a probability, got {p!r}")
        for k in ("rotate", "scale", "shift"):
            if getattr(self, k) < 0:
                raise ValueError(f"SilhouetteAugment: {k} must be >= 0, got {getattr(self, k)!r}")
        if self.scale >= 1:
            raise ValueError(f"SilhouetteAugment: scale must be < 1, got {self.scale!r}")
        lo, hi = self.erase_area
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError("SilhouetteAugment: erase_area must be 0 < low <= high < 1, "
                             f"got {self.erase_area!r}")
        object.__setattr__(self, "erase_area", (float(lo), float(hi)))

    @classmethod
    def from_config(cls, d: dict | None) -> "SilhouetteAugment":
        """From a config's ``data.augment`` mapping (unknown keys are an error)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"SilhouetteAugment: unknown keys {bad} (known: {sorted(known)})")
        if "erase_area" in d:
            d["erase_area"] = tuple(d["erase_area"])
        return cls(**d)

    @property
    def enabled(self) -> bool:
        return self.flip > 0 or self.affine > 0 or self.erase > 0

    def __call__(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``clip [T, H, W]`` -> an augmented clip of the same shape and dtype (may be a view)."""
        if clip.ndim != 3:
            raise ValueError(f"SilhouetteAugment: expected a clip [T, H, W], got {clip.shape}")
        # One draw of each kind per sequence, whether used or not, so that enabling one
        # transform does not reshuffle the others' randomness.
        u = rng.random(3)
        if u[0] < self.flip:
            clip = clip[:, :, ::-1]
        if u[1] < self.affine:
            clip = self._warp(clip, rng)
        if u[2] < self.erase:
            clip = self._erase(clip, rng)
        return clip

    def _warp(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        H, W = clip.shape[1:]
        angle = rng.uniform(-self.rotate, self.rotate)
        scale = rng.uniform(1.0 - self.scale, 1.0 + self.scale)
        ty = rng.uniform(-self.shift, self.shift) * H
        tx = rng.uniform(-self.shift, self.shift) * W
        return warp(clip, -angle, scale, ty, tx)   # (sign: as the recorded runs drew it)

    def _erase(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        T, H, W = clip.shape
        area = rng.uniform(*self.erase_area) * H * W
        ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        h = int(min(H, max(1, round(math.sqrt(area * ratio)))))
        w = int(min(W, max(1, round(math.sqrt(area / ratio)))))
        fg = np.flatnonzero(clip.max(axis=0))
        if fg.size:
            c = int(fg[rng.integers(0, fg.size)])
            y = min(max(c // W - h // 2, 0), H - h)
            x = min(max(c % W - w // 2, 0), W - w)
        else:
            y = int(rng.integers(0, H - h + 1))
            x = int(rng.integers(0, W - w + 1))
        out = np.array(clip, copy=True)
        out[:, y:y + h, x:x + w] = 0
        return out


def warp(clip: np.ndarray, angle: float, scale: float = 1.0, ty: float = 0.0,
         tx: float = 0.0) -> np.ndarray:
    """All frames of ``clip [T, H, W]`` rotated by ``angle`` degrees (counter-clockwise as
    displayed, rows growing downwards) and scaled by ``scale`` about the frame centre, then
    shifted by ``(ty, tx)`` pixels; nearest-neighbour, zeros where the source is outside."""
    T, H, W = clip.shape
    if scale <= 0:
        raise ValueError(f"warp: scale must be > 0, got {scale!r}")
    a = math.radians(angle)
    cy, cx = (H - 1) / 2.0, (W - 1) / 2.0
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    # inverse map: output pixel -> source pixel (undo the shift, then rotate by -a, scale 1/s)
    dy, dx = yy - cy - ty, xx - cx - tx
    c, s = math.cos(a) / scale, math.sin(a) / scale
    sy = np.rint(c * dy + s * dx + cy).astype(np.int64)
    sx = np.rint(-s * dy + c * dx + cx).astype(np.int64)
    inside = (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
    src = np.where(inside, sy * W + sx, 0).ravel()
    out = np.ascontiguousarray(clip).reshape(T, H * W)[:, src]
    out *= inside.ravel().astype(out.dtype)
    return out.reshape(T, H, W)

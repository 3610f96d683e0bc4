"""Modules around qgait.ops.pooling: the temporal pooling + horizontal pyramid pooling head of a
silhouette gait model (see qgait/ops/pooling.py for the semantics)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qgait.ops.pooling import (DEFAULT_BINS, MODES, horizontal_pyramid_pool, set_pool_hpp,
                               temporal_pool)


def _bins(bins) -> tuple[int, ...]:
    bins = (bins,) if isinstance(bins, int) else tuple(bins)
    if not bins or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bins):
        raise ValueError(f"bins must be a non-empty sequence of ints > 0, got {bins!r}")
    return bins


def _mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return mode


class TemporalPool(nn.Module):
    """Max over frames: ``[N, C, T, H, W] -> [N or len(seqL), C, H, W]``
    (OpenGait's ``PackSequenceWrapper(torch.max)``)."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor, seqL=None) -> torch.Tensor:
        return temporal_pool(x, seqL, backend=self.backend)


class HorizontalPyramidPool(nn.Module):
    """``[N, C, H, W] -> [N, C, sum(bins)]``: mean + max (or ``mode``) of horizontal strips
    (OpenGait's ``HorizontalPoolingPyramid``)."""

    def __init__(self, bins: Sequence[int] = DEFAULT_BINS, mode: str = "mean+max",
                 backend: str | None = None):
        super().__init__()
        self.bins, self.mode, self.backend = _bins(bins), _mode(mode), backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return horizontal_pyramid_pool(x, self.bins, self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, mode={self.mode!r}"


class SetPoolHPP(nn.Module):
    """Temporal max pooling and horizontal pyramid pooling in one pass:
    ``[N, C, T, H, W] -> [N or len(seqL), C, sum(bins)]``.

    Example:
        >>> head = SetPoolHPP(bins=(16,))
        >>> feat = head(torch.randn(1, 128, 30, 16, 11), seqL=[12, 18])  # [2, 128, 16]
    """

    def __init__(self, bins: Sequence[int] = DEFAULT_BINS, mode: str = "mean+max",
                 backend: str | None = None):
        super().__init__()
        self.bins, self.mode, self.backend = _bins(bins), _mode(mode), backend

    def forward(self, x: torch.Tensor, seqL=None) -> torch.Tensor:
        return set_pool_hpp(x, seqL, self.bins, self.mode, backend=self.backend)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, mode={self.mode!r}"
